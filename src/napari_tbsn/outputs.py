"""Which paths may be written: one rule for every front end (Python, the CLI, the widget).

Nothing the user already has is lost. An output may not be an input, lie inside one or hold
one (symlinks resolved): the denoise reads its input lazily while it writes. An existing zarr
store is replaced only when napari-tbsn wrote it, or when the user said so (`--overwrite`, or
the widget's question). The whole output must fit in the free space before any work starts,
and files are reserved on disk before they are memory-mapped, so a full disk is a message,
never a SIGBUS. Finished outputs reach the disk (fsync) before they are renamed into place.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

# Files a zarr store (format 2 or 3) has at its root; a folder without them is not ours to replace.
ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")
# The attribute every zarr store napari-tbsn writes carries, so that it may replace it later.
RESULT_MARKER = "napari_tbsn"
WRITABLE_SUFFIXES = (".tif", ".tiff", ".npy", ".zarr")


class ReplaceRefused(ValueError):
    """The output is an existing store that napari-tbsn did not write: replacing it needs a yes."""

    def __init__(self, path: Path, how_to_allow: str = "") -> None:
        self.path = path
        super().__init__(
            f"{path} is an existing zarr store that napari-tbsn did not write (your data?), so it is not replaced; "
            f"choose a new name{how_to_allow}"
        )


def overlaps(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether `a` and `b` are the same file or folder, or one lies inside the other (a store
    `x.zarr` replaced takes its array `x.zarr/0` with it), symlinks resolved."""
    first, second = Path(a).resolve(), Path(b).resolve()
    if first == second or first.is_relative_to(second) or second.is_relative_to(first):
        return True
    try:  # hard links, and paths the resolution above cannot see through (bind mounts)
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def source_paths(data: Any) -> list[Path]:
    """The files or stores an array reads from, where it tells: memory maps, lazy TIFFs, zarr
    arrays (also inside a dask array made with dask.array.from_zarr)."""
    found: list[Path] = []
    seen: set[int] = set()
    pending = [data]
    while pending:
        item = pending.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        for name in ("filename", "path"):
            value = getattr(item, name, None)
            if isinstance(value, (str, os.PathLike)) and (isinstance(item, np.memmap) or name == "path") \
                    and os.path.isabs(os.fspath(value)):
                found.append(Path(value))
        store = getattr(item, "store", None)
        for root in (getattr(store, "root", None), getattr(store, "path", None)):
            if isinstance(root, (str, os.PathLike)) and os.fspath(root):
                found.append(Path(root))
        pending.append(getattr(item, "base", None))
        graph = getattr(item, "dask", None)  # a dask array: its graph holds the arrays it reads
        if graph is not None and len(graph) < 100_000:
            with contextlib.suppress(Exception):
                pending.extend(v for v in graph.values() if hasattr(v, "store") or isinstance(v, np.memmap))
    return list(dict.fromkeys(found))


def is_result_store(path: Path) -> bool:
    """Whether the zarr store at `path` was written by napari-tbsn."""
    import json

    for marker in ("zarr.json", ".zattrs"):
        with contextlib.suppress(OSError, ValueError):
            attributes = json.loads((path / marker).read_text())
            attributes = attributes.get("attributes", attributes) if marker == "zarr.json" else attributes
            if RESULT_MARKER in attributes:
                return True
    return False


def check_writable(path: str | os.PathLike) -> None:
    """Refuse an image output path that cannot be written, creating nothing."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir() and suffix != ".zarr":
        example = path / f"denoised{suffix if suffix in WRITABLE_SUFFIXES else '.tif'}"
        raise ValueError(f"{path} is a folder; give a file name such as {example}")
    if suffix not in WRITABLE_SUFFIXES:
        raise ValueError(f"cannot write {path.name}: use a .tif/.tiff, .npy or .zarr name")
    if suffix == ".zarr":
        from .image_io import _import_zarr
        from .omezarr import _import_ome_zarr, is_ome_zarr_name

        _import_zarr(path)
        if is_ome_zarr_name(path):
            _import_ome_zarr()
        # The new store replaces the old one wholesale; never do that to a folder zarr did not make.
        if os.path.lexists(path) and not (path.is_dir() and any((path / m).exists() for m in ZARR_MARKERS)):
            raise ValueError(
                f"{path} exists and is not a zarr store, so it will not be replaced; "
                "choose another name or remove it yourself"
            )
    _check_folder_creatable(path.parent)


def check_writable_file(path: str | os.PathLike) -> None:
    """A model or report path: a file name whose folder exists or can be made."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name such as {path / 'model.safetensors'}")
    _check_folder_creatable(path.parent)


def _check_folder_creatable(folder: Path) -> None:
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot create the folder {folder}: {existing} is a file, not a folder; choose another location")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"no permission to write in {existing}; choose another location")


def check_output(path: str | os.PathLike,
                 inputs: Iterable[str | os.PathLike] | Mapping[str, str | os.PathLike] = (), *,
                 replace: bool = False, how_to_allow: str = "", role: str = "the output") -> None:
    """Refuse `path` as an image output before any work: an input's path (or one inside or
    around it), an unwritable place, or (unless `replace`) an existing store that napari-tbsn
    did not write. `how_to_allow` ends that last message, e.g. "; or add --overwrite"."""
    path = Path(path)
    check_not_input(path, inputs, role)
    check_writable(path)
    if not replace and path.suffix.lower() == ".zarr" and path.is_dir() and not is_result_store(path):
        raise ReplaceRefused(path, how_to_allow)


def check_not_input(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] | Mapping[str, str | os.PathLike],
                    role: str = "the output") -> None:
    """Refuse an output at an input's path, inside it or around it (symlinks resolved).
    `inputs`: paths, or {what each is ("input", "model"): path}."""
    named = inputs.items() if isinstance(inputs, Mapping) else (("input", source) for source in inputs)
    for name, source in named:
        if overlaps(path, source):
            raise ValueError(f"{role} {path} is {_relation(Path(path), Path(source))} the {name} path {source}; "
                             "writing there would destroy the data being read: choose a new name")


def _relation(path: Path, source: Path) -> str:
    first, second = path.resolve(), source.resolve()
    if first.is_relative_to(second) and first != second:
        return "inside"
    return "a folder holding" if second.is_relative_to(first) and first != second else "also"


# -- disk space ---------------------------------------------------------------------------------


def _existing_folder(path: Path) -> Path:
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_room(outputs: Iterable[tuple[str | os.PathLike, int]], what: str | None = None) -> None:
    """Refuse to start work whose outputs ((path, uncompressed bytes) pairs) cannot all fit on
    the disks they go to, counted together per disk. What an interrupted resumable run already
    wrote counts as written; a store being replaced frees its space only after the new one is
    complete."""
    import shutil

    disks: dict[int, tuple[Path, int, list[str]]] = {}
    for path, nbytes in outputs:
        path = Path(path)
        folder = _existing_folder(path)
        device = os.stat(folder).st_dev
        first, total, names = disks.get(device, (folder, 0, []))
        disks[device] = (first, total + max(0, nbytes - _bytes_in(path.with_name(f".{path.name}.resumable"))),
                         [*names, path.name])
    for folder, nbytes, names in disks.values():
        free = shutil.disk_usage(folder).free
        if nbytes > free:
            subject = what or ("the result " + " and ".join(names))
            raise ValueError(f"{subject} needs {format_bytes(nbytes)} but {folder} has {format_bytes(free)} free; "
                             "free some space or choose another location")


def _bytes_in(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(entry.stat().st_size for entry in folder.rglob("*") if entry.is_file())


def reserve(file: str | os.PathLike, nbytes: int) -> None:
    """Allocate the blocks of a file that will be memory-mapped, so that running out of space
    is an error now rather than a SIGBUS (which kills the process, napari included) later."""
    import errno

    with no_room_is_an_error(Path(file).parent, nbytes):
        descriptor = os.open(file, os.O_RDWR)
        try:
            if hasattr(os, "posix_fallocate") and nbytes > 0:
                os.posix_fallocate(descriptor, 0, nbytes)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # else a filesystem that cannot reserve
                raise
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def no_room_is_an_error(folder: Path, nbytes: int):
    """Turn running out of space (or over a file-size limit) inside the block into a one-line
    ValueError that says how much was needed and where."""
    import errno

    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        raise ValueError(f"no room for {format_bytes(nbytes)} at {folder} ({error.strerror}); "
                         "free some space or choose another location") from error


def format_bytes(nbytes: float) -> str:
    """`nbytes` as a person reads it: 512 bytes, 3.2 GB."""
    if nbytes < 1000:
        return f"{nbytes:.0f} bytes"
    for unit in ("KB", "MB", "GB"):
        nbytes /= 1000
        if nbytes < 1000:
            return f"{nbytes:.1f} {unit}"
    return f"{nbytes / 1000:.1f} TB"


# -- durability ---------------------------------------------------------------------------------


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or every file and folder of a store, to the disk."""
    path = Path(path)
    if path.is_dir():
        for folder, _, files in os.walk(path):
            for name in files:
                _fsync(Path(folder) / name, os.O_RDONLY)
            _fsync(Path(folder), os.O_RDONLY)
    else:
        _fsync(path, os.O_RDONLY)


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename inside `folder` durable."""
    _fsync(Path(folder), os.O_RDONLY)


def _fsync(path: Path, flags: int) -> None:
    """fsync one file (its errors, e.g. EIO, propagate: the rename must not follow) or folder
    (where the system allows: Windows cannot open folders, some file systems refuse)."""
    folder = path.is_dir()
    try:
        descriptor = os.open(path, flags)
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError:
        if not folder:
            raise
    finally:
        os.close(descriptor)
