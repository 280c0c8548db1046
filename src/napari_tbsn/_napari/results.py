"""Where the widget's results go: arrays in memory or in self-deleting memory maps beside the
result file, and napari layers that sit where their source layer sits."""

from __future__ import annotations

import atexit
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from ..image_io import output_bytes
from ..outputs import check_room, format_bytes, reserve

IN_MEMORY_LIMIT = 2 * 1024**3  # larger results go to a memory-mapped file beside the result file


def memmap_in(folder: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 memory map in a hidden file in `folder` that nothing has to delete: the file is
    unlinked at once (its pages live as long as the mapping), or, where the system refuses that,
    at exit. Its space is reserved first: a full disk is an error now, not a SIGBUS later."""
    check_room([(folder / "result.npy", output_bytes(shape))], "the result")
    file = folder / f".napari-tbsn-{secrets.token_hex(6)}.npy"
    array = np.lib.format.open_memmap(file, mode="w+", dtype=np.float32, shape=shape)
    try:
        reserve(file, os.path.getsize(file))
    except BaseException:
        del array
        file.unlink(missing_ok=True)
        raise
    try:
        file.unlink()
    except OSError:  # an open file cannot be removed on Windows
        atexit.register(lambda: file.unlink(missing_ok=True))
    return array


def output_array(shape: tuple[int, ...], beside: Path | None = None) -> np.ndarray:
    """Memory for a result of `shape`: in RAM up to IN_MEMORY_LIMIT, else a memory map in the
    folder of the result file `beside` (never the temp folder, often RAM itself)."""
    if beside is None:
        check_fits_in_memory(shape)
    if output_bytes(shape) <= IN_MEMORY_LIMIT:
        return np.empty(shape, dtype=np.float32)
    beside.parent.mkdir(parents=True, exist_ok=True)
    return memmap_in(beside.parent, shape)


def check_fits_in_memory(shape: tuple[int, ...]) -> None:
    """Refuse a result too large to keep in memory (the widget then needs a result file)."""
    nbytes = output_bytes(shape)
    if nbytes > IN_MEMORY_LIMIT:
        raise ValueError(f"the result needs {format_bytes(nbytes)}, more than the {format_bytes(IN_MEMORY_LIMIT)} "
                         "kept in memory: choose a result file (.ome.zarr) on a disk with room for it")


def in_type_of(out: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`out` rounded and clipped into the integer `dtype` (a float dtype: cast), in place of a
    float32 copy 2-4x the size."""
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.integer):
        return out.astype(dtype, copy=False)
    info = np.iinfo(dtype)
    result = np.empty(out.shape, dtype)
    for index in range(out.shape[0]) if out.ndim > 2 else [Ellipsis]:  # a plane at a time: no float copy
        result[index] = np.clip(np.rint(out[index]), info.min, info.max)
    return result


def contrast_limits(out) -> tuple[float, float]:
    """Display limits from a strided sample of `out` (a read of every chunk of a zarr result:
    run it in the worker, not on the GUI thread)."""
    sample = np.asarray(out[tuple(slice(None, None, max(1, s // 256)) for s in out.shape)])
    finite = sample[np.isfinite(sample)]
    low, high = np.percentile(finite, [0.5, 99.9]) if finite.size else (0.0, 1.0)
    return float(low), float(max(high, low + 1e-6))


def add_result_layer(viewer, layer, out, name: str, limits: tuple[float, float], translate=None,
                     colormap: str | None = None, replace: bool = False) -> None:
    """Add `out` as an image layer with the source `layer`'s scale, place, axes and look."""
    kwargs: dict[str, Any] = {
        "name": name, "scale": layer.scale, "translate": layer.translate if translate is None else translate,
        "contrast_limits": limits, "colormap": colormap or layer.colormap.name,
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
