"""OME-Zarr images in and out, through ome-zarr-py.

ome-zarr-py is the OME's own reference implementation of the NGFF specification, and the reader
napari-ome-zarr opens images with: what it writes, napari opens lazily, level by level. (ngff-zarr
is well kept too, but builds on a chain of xarray-style image types that we would only convert
away from.) We read level 0 of a multiscale image with its axes and physical scale, and write
results with the same axes, scale and chunks, plus downsampled levels on request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import MissingDependency

# NGFF axis names -> our letters, and the axis types NGFF gives them.
OME_AXES = {"t": "T", "c": "C", "z": "Z", "y": "Y", "x": "X"}
AXIS_TYPES = {"T": "time", "C": "channel", "Z": "space", "Y": "space", "X": "space"}
PYRAMID_FACTOR = 2


def is_ome_zarr_name(path: Path) -> bool:
    return path.name.lower().endswith(".ome.zarr")


def _import_ome_zarr():
    try:
        import ome_zarr.io
        import ome_zarr.reader
        import ome_zarr.writer
    except ImportError as error:
        raise MissingDependency("OME-Zarr images", "ome_zarr") from error
    return ome_zarr


def read_ome_zarr(path: Path) -> tuple[Any, str | None, dict[str, Any]] | None:
    """(level-0 zarr array, our axis letters or None, {"ome": metadata}) of the OME-Zarr
    multiscale image at `path`, or None where `path` holds none."""
    import zarr

    ome_zarr = _import_ome_zarr()
    location = ome_zarr.io.parse_url(str(path))
    if location is None:
        return None
    for node in ome_zarr.reader.Reader(location)():
        spec = next((s for s in node.specs if isinstance(s, ome_zarr.reader.Multiscales)), None)
        if spec is None:
            continue
        level = spec.datasets[0]
        data = zarr.open_array(str(path), path=level, mode="r")
        axes = node.metadata.get("axes") or []
        letters = "".join(OME_AXES.get(str(axis.get("name", "")).lower(), "?") for axis in axes)
        transforms = (node.metadata.get("coordinateTransformations") or [None])[0] or []
        found = {t.get("type"): t.get(t.get("type")) for t in transforms if t.get("type") in ("scale", "translation")}
        metadata = {"axes": axes, "scale": found.get("scale"), "translation": found.get("translation"),
                    "name": node.metadata.get("name")}
        return data, (letters if letters and "?" not in letters and len(letters) == data.ndim else None), {"ome": metadata}
    return None


def _ome_axes(axes: str, like: dict[str, Any] | None) -> list[dict[str, Any]]:
    if like and len(like.get("axes") or []) == len(axes):
        return [dict(axis) for axis in like["axes"]]
    if "S" in axes:
        raise ValueError(f"OME-Zarr has no sample axis (axes {axes!r}); write a .zarr or .tif output instead")
    return [{"name": letter.lower(), "type": AXIS_TYPES[letter]} for letter in axes]


def _level_transforms(axes: list[dict[str, Any]], scale: list[float], translation: list[float] | None,
                      level: int) -> list[dict[str, Any]]:
    """Level `level`'s scale and translation: Y and X binned by PYRAMID_FACTOR ** level, the
    pixel centres moved to the centres of the binned blocks."""
    factor = PYRAMID_FACTOR**level
    binned = [str(axis.get("name", "")).lower() in ("y", "x") for axis in axes]
    level_scale = [s * factor if b else s for s, b in zip(scale, binned)]
    transforms: list[dict[str, Any]] = [{"type": "scale", "scale": level_scale}]
    if translation is not None or level:
        offset = translation or [0.0] * len(scale)
        shifted = [t + (factor - 1) * s / 2 if b else t for t, s, b in zip(offset, scale, binned)]
        transforms.append({"type": "translation", "translation": shifted})
    return transforms


def _write_metadata(group, axes: list[dict[str, Any]], scale: list[float], translation: list[float] | None,
                    levels: int, name: str | None) -> None:
    ome_zarr = _import_ome_zarr()
    datasets = [{"path": str(level), "coordinateTransformations": _level_transforms(axes, scale, translation, level)}
                for level in range(levels)]
    ome_zarr.writer.write_multiscales_metadata(group, datasets, axes=axes, name=name or "denoised")
    group.attrs["napari_tbsn"] = {"scale": scale, "translation": translation, "levels": levels}


def _image_metadata(shape: tuple[int, ...], axes: str, like: dict[str, Any] | None):
    """(NGFF axes, scale, translation, name) of a result of `shape`: `like`'s where they fit."""
    ome_axes = _ome_axes(axes, like)
    scale = list(like["scale"]) if like and like.get("scale") and len(like["scale"]) == len(shape) else [1.0] * len(shape)
    translation = like.get("translation") if like else None
    if translation is not None and len(translation) != len(shape):
        translation = None
    return ome_axes, scale, translation, like.get("name") if like else None


def create_ome_zarr(folder: Path, shape: tuple[int, ...], axes: str, chunks: tuple[int, ...],
                    like: dict[str, Any] | None):
    """An OME-Zarr image in the empty folder `folder` with one float32 level of `shape`; the
    axes, scale and name of `like` (an input's "ome" metadata) where it has them."""
    import zarr

    ome_axes, scale, translation, name = _image_metadata(shape, axes, like)
    group = zarr.open_group(str(folder), mode="a")
    level = group.create_array("0", shape=tuple(shape), chunks=tuple(chunks), dtype="float32",
                               dimension_names=[axis["name"] for axis in ome_axes])
    _write_metadata(group, ome_axes, scale, translation, 1, name)
    return level


def rewrite_ome_metadata(folder: Path, shape: tuple[int, ...], axes: str, like: dict[str, Any] | None) -> None:
    """Give the OME-Zarr image at `folder` (one level, reopened to resume) this run's axes,
    scale and name; levels a pyramid adds later get theirs from write_pyramid."""
    import zarr

    ome_axes, scale, translation, name = _image_metadata(shape, axes, like)
    _write_metadata(zarr.open_group(str(folder), mode="r+"), ome_axes, scale, translation, 1, name)


def write_pyramid(folder: Path, levels: int) -> None:
    """Add `levels` levels to the OME-Zarr image at `folder`, each the previous one averaged
    over PYRAMID_FACTOR x PYRAMID_FACTOR pixels in Y and X."""
    import dask.array as da
    import zarr

    if levels < 0:
        raise ValueError(f"a pyramid has 0 or more levels, not {levels}")
    group = zarr.open_group(str(folder), mode="r+")
    ours = group.attrs["napari_tbsn"]
    ome = group.attrs.get("ome", group.attrs)
    axes = ome["multiscales"][0]["axes"]
    binned = {i: PYRAMID_FACTOR for i, axis in enumerate(axes) if str(axis.get("name", "")).lower() in ("y", "x")}
    previous = group["0"]
    made = 1
    for level in range(1, levels + 1):
        if any(previous.shape[i] < PYRAMID_FACTOR for i in binned):
            break
        coarse = da.coarsen(np.mean, da.from_zarr(previous), binned, trim_excess=True).astype(np.float32)
        chunks = tuple(min(c, s) for c, s in zip(previous.chunks, coarse.shape))
        # overwrite: a level left by an interrupted run is made again.
        array = group.create_array(str(level), shape=coarse.shape, chunks=chunks, dtype="float32",
                                   dimension_names=[axis["name"] for axis in axes], overwrite=True)
        # One dask block per zarr chunk: no two threads write parts of the same chunk.
        da.store(coarse.rechunk(chunks), array, scheduler="threads", lock=False)
        previous, made = array, level + 1
    _write_metadata(group, axes, ours["scale"], ours["translation"], made, ome["multiscales"][0].get("name"))
