"""Where the widget's results go: arrays in memory or in self-deleting memory maps, and
napari layers that sit where their source layer sits."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Any

import numpy as np

IN_MEMORY_LIMIT = 2 * 1024**3  # larger results go to a temporary memory-mapped file


def temporary_memmap(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 memory map in a temporary file that nothing has to delete: the file is unlinked
    at once (its pages live as long as the mapping), or, where the system refuses that, at exit."""
    folder = tempfile.mkdtemp(prefix="napari-tbsn-")
    array = np.lib.format.open_memmap(os.path.join(folder, "denoised.npy"), mode="w+", dtype=np.float32, shape=shape)
    try:
        shutil.rmtree(folder)
    except OSError:  # an open file cannot be removed on Windows
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return array


def output_array(shape: tuple[int, ...]) -> np.ndarray:
    if np.prod(shape, dtype=np.int64) * 4 <= IN_MEMORY_LIMIT:
        return np.empty(shape, dtype=np.float32)
    return temporary_memmap(shape)


def add_result_layer(viewer, layer, out, name: str, translate=None, colormap: str | None = None,
                     replace: bool = False) -> None:
    """Add `out` as an image layer with the source `layer`'s scale, place, axes and look."""
    sample = np.asarray(out[tuple(slice(None, None, max(1, s // 256)) for s in out.shape)])
    low, high = np.percentile(sample, [0.5, 99.9]) if sample.size else (0.0, 1.0)
    kwargs: dict[str, Any] = {
        "name": name, "scale": layer.scale, "translate": layer.translate if translate is None else translate,
        "contrast_limits": (float(low), float(max(high, low + 1e-6))), "colormap": colormap or layer.colormap.name,
        "blending": layer.blending, "rgb": layer.rgb,
    }
    for optional in ("axis_labels", "units"):
        if getattr(layer, optional, None) is not None:
            kwargs[optional] = getattr(layer, optional)
    if replace and name in viewer.layers:
        viewer.layers.remove(name)
    viewer.add_image(out, **kwargs)


def shown_plane(viewer, layer, layout) -> tuple[tuple[int, ...], np.ndarray]:
    """The plane of `layer` (its index along every S/T/Z axis) at the slice the viewer shows,
    and the translate that puts a one-plane result of it there."""
    point = np.asarray(viewer.dims.point[-layer.ndim:], dtype=float)
    data_point = (point - np.asarray(layer.translate)) / np.asarray(layer.scale)
    plane = tuple(int(np.clip(round(data_point[axis]), 0, layout.shape[axis] - 1)) for axis in layout.plane_axes)
    translate = np.asarray(layer.translate, dtype=float).copy()
    for axis, index in zip(layout.plane_axes, plane):
        translate[axis] += index * layer.scale[axis]
    return plane, translate
