"""Reading and writing image files (TIFF, .npy, .zarr) lazily, and writing them atomically.

Inputs are opened as memory maps or lazy arrays where the format allows, so a terabyte
stack is read one plane at a time. Outputs are written under a temporary name beside the
target and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .axes import AXIS_LETTERS
from .model_io import atomic_file, atomic_target

# tifffile's axis letters -> ours. tifffile's S is RGB samples, i.e. our C.
TIFF_AXES = {"T": "T", "Z": "Z", "C": "C", "S": "C", "Y": "Y", "X": "X"}
IMAGEJ_ORDER = "TZCYX"


@dataclass
class ImageFile:
    data: Any
    axes: str | None
    format: str
    metadata: dict[str, Any] = field(default_factory=dict)


def release_pages(array) -> None:
    """Let the kernel drop the resident pages of a memory-mapped array we are done with.

    Pages of a file mapping count towards the process's memory while mapped; streaming a
    stack through a memmap would otherwise grow with the stack. Written pages stay in the
    page cache and reach the file as usual.
    """
    base = array
    while base is not None:
        if isinstance(base, np.memmap):
            handle = getattr(base, "_mmap", None)
            if handle is not None and hasattr(handle, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                with contextlib.suppress(OSError, ValueError, TypeError):
                    if base.flags.writeable:
                        base.flush()
                    handle.madvise(mmap.MADV_DONTNEED)
            return
        base = getattr(base, "base", None)


def _tiff_axes(letters: str) -> str | None:
    mapped = "".join(TIFF_AXES.get(a, "?") for a in letters.upper())
    if "?" in mapped or len(set(mapped)) != len(mapped) or not set(mapped) <= set(AXIS_LETTERS):
        return None
    return mapped


def read_image(path: str | os.PathLike) -> ImageFile:
    """Open an image lazily; axes from its metadata where it has them."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        return _read_tiff(path)
    if suffix == ".npy":
        try:
            data = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as error:
            raise ValueError(f"{path} is not a readable .npy array: {error}") from error
        return ImageFile(data, None, "npy")
    if suffix == ".zarr":
        import zarr

        data = zarr.open(str(path), mode="r")
        if not hasattr(data, "shape"):
            raise ValueError(f"{path} is a zarr group; point at one array inside it (e.g. {path}/0)")
        axes = data.attrs.get("axes")
        return ImageFile(data, axes if isinstance(axes, str) else None, "zarr")
    raise ValueError(f"cannot read {path.name}: use a .tif/.tiff, .npy or .zarr file")


def _read_tiff(path: Path) -> ImageFile:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes = _tiff_axes(series.axes)
            page = tif.pages[0]
            metadata: dict[str, Any] = {}
            if tif.is_imagej and tif.imagej_metadata:
                kept = {k: v for k, v in tif.imagej_metadata.items() if k in ("spacing", "unit", "finterval")}
                metadata["imagej"] = kept
            tags = page.tags
            if "XResolution" in tags and "YResolution" in tags:
                metadata["resolution"] = (tags["XResolution"].value, tags["YResolution"].value)
                if "ResolutionUnit" in tags:
                    metadata["resolutionunit"] = int(tags["ResolutionUnit"].value)
            shape = series.shape
    except (tifffile.TiffFileError, ValueError, IndexError) as error:
        raise ValueError(f"{path} is not a readable TIFF file: {error}") from error
    try:
        data = tifffile.memmap(path, mode="r")
        if data.shape != shape:
            raise ValueError("memmap shape differs from the series shape")
    except (ValueError, TypeError, OSError):
        data = tifffile.imread(path)  # compressed or tiled: read it whole
    return ImageFile(data, axes, "tiff", metadata)


def _tiff_options(axes: str, like: ImageFile | None) -> dict[str, Any]:
    metadata = like.metadata if like is not None else {}
    options: dict[str, Any] = {}
    if "resolution" in metadata:
        options["resolution"] = tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in metadata["resolution"])
        if "resolutionunit" in metadata:
            options["resolutionunit"] = metadata["resolutionunit"]
    imagej_order = [IMAGEJ_ORDER.index(a) for a in axes if a in IMAGEJ_ORDER]
    if set(axes) <= set(IMAGEJ_ORDER) and imagej_order == sorted(imagej_order):
        options["imagej"] = True
        options["metadata"] = {"axes": axes, **metadata.get("imagej", {})}
    else:
        options["metadata"] = {"axes": axes}
    return options


@contextlib.contextmanager
def open_output(path: str | os.PathLike, shape: tuple[int, ...], axes: str, like: ImageFile | None = None) -> Iterator[Any]:
    """A writable float32 array that becomes `path` only if the block completes."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".tif", ".tiff", ".npy", ".zarr"):
        raise ValueError(f"cannot write {path.name}: use a .tif/.tiff, .npy or .zarr name")
    if suffix == ".zarr":
        yield from _zarr_output(path, shape, axes)
        return
    with atomic_file(path) as temporary:
        if suffix == ".npy":
            out = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float32, shape=tuple(shape))
        else:
            import tifffile

            big = np.prod(shape, dtype=np.int64) * 4 > 2**31
            out = tifffile.memmap(
                temporary, shape=tuple(shape), dtype=np.float32, bigtiff=bool(big), **_tiff_options(axes, like)
            )
        yield out
        out.flush()
        del out


def _zarr_output(path: Path, shape: tuple[int, ...], axes: str) -> Iterator[Any]:
    import zarr

    temporary = atomic_target(path)
    temporary.unlink()
    chunks = tuple(s if a in "CYX" else 1 for a, s in zip(axes, shape))
    try:
        out = zarr.open_array(str(temporary), mode="w", shape=tuple(shape), chunks=chunks, dtype="float32")
        out.attrs["axes"] = axes
        yield out
        if path.exists():
            backup = path.with_name(f".{path.name}.old")
            os.replace(path, backup)
            os.replace(temporary, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(temporary, path)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
