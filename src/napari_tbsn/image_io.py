"""Reading and writing image files (TIFF, .npy, .zarr) lazily, and writing them atomically.

Reading. Inputs are opened without loading them, so a terabyte stack is read one plane at a
time: uncompressed TIFFs and .npy files as memory maps, compressed or tiled TIFFs as a
`LazyTiffArray` that decodes only the pages an index touches, .zarr stores through zarr.
A file that cannot be read (empty, truncated, not an image, a folder) is refused here with a
one-line ValueError that says what to do, not with a traceback from deep inside a library.

Writing. `outputs.check_output` refuses an output path that may not be written before any
work is done (an input, an unwritable place, a store napari-tbsn did not write, too little free
space). `open_output` writes under a hidden temporary name beside the target, reserves its
space, and renames it into place only when the block completes and the data are on disk; on any
exception, Ctrl-C included, the temporary goes. Outputs get the permissions the umask gives a
new file, like any file the user saves.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import operator
import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import numpy as np

from .axes import AXIS_LETTERS
from .errors import MissingDependency
from .model_io import atomic_file
from .omezarr import create_ome_zarr, is_ome_zarr_name, read_ome_zarr, rewrite_ome_metadata, write_pyramid
from .outputs import (RESULT_MARKER, check_output, check_room, fsync_folder, fsync_path,
                      no_room_is_an_error, reserve)

# tifffile's axis letters -> ours. tifffile's S is RGB samples, i.e. our C.
TIFF_AXES = {"T": "T", "Z": "Z", "C": "C", "S": "C", "Y": "Y", "X": "X"}
IMAGEJ_ORDER = "TZCYX"
TIFF_SUFFIXES = (".tif", ".tiff")
READABLE = "a .tif/.tiff, .npy or .zarr file"


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
            if base.mode == "c":  # copy-on-write: the edits live only in these pages
                return
            handle = getattr(base, "_mmap", None)
            if handle is not None and hasattr(handle, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                with contextlib.suppress(OSError, ValueError, TypeError):
                    if base.flags.writeable:
                        base.flush()
                    handle.madvise(mmap.MADV_DONTNEED)
            return
        base = getattr(base, "base", None)


# -- reading ------------------------------------------------------------------------------


def read_image(path: str | os.PathLike) -> ImageFile:
    """Open an image lazily; axes from its metadata where it has them."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    suffix = path.suffix.lower()
    if suffix in (*TIFF_SUFFIXES, ".npy") and path.is_dir():
        raise ValueError(
            f"{path} is a folder, not a file; give the {suffix} file itself (only .zarr inputs are folders)"
        )
    if suffix in TIFF_SUFFIXES:
        return _read_tiff(path)
    if suffix == ".npy":
        return _read_npy(path)
    if suffix == ".zarr":
        return _read_zarr(path)
    raise ValueError(f"cannot read {path.name}: use {READABLE}")


def _read_npy(path: Path) -> ImageFile:
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except EOFError as error:  # numpy's answer to a 0-byte file
        raise ValueError(f"{path} is empty; save the array again with numpy.save") from error
    except (ValueError, OSError, UnpicklingError) as error:
        # Truncated files, pickled objects and object arrays (which cannot be memory-mapped)
        # all arrive here as ValueError, with numpy's reason in the message.
        raise ValueError(
            f"{path} is not a readable .npy array ({error}); it may be truncated or hold Python "
            "objects: save a numeric array again with numpy.save"
        ) from error
    # np.load opens an .npz archive whatever its name. A bad file, not a bad argument: ValueError.
    if not isinstance(data, np.ndarray):
        raise ValueError(f"{path} is an .npz archive, not an .npy array; save one array with numpy.save")  # noqa: TRY004
    return ImageFile(data, None, "npy")


def _import_zarr(path: Path):
    """zarr is an optional dependency: say how to get it instead of failing on the import."""
    try:
        import zarr
    except ImportError as error:
        raise MissingDependency(f"{path.name} (a .zarr store)", "zarr") from error
    return zarr


def _read_zarr(path: Path) -> ImageFile:
    zarr = _import_zarr(path)
    try:
        data = zarr.open(str(path), mode="r")
    except (ValueError, OSError, KeyError) as error:  # zarr 2 and 3 raise different subclasses
        raise ValueError(f"{path} is not a readable zarr store ({error}); point at a zarr array") from error
    if not hasattr(data, "shape"):
        found = read_ome_zarr(path)
        if found is not None:
            level, axes, metadata = found
            return ImageFile(level, axes, "ome-zarr", metadata)
        raise ValueError(f"{path} is a zarr group but no OME-Zarr image; point at one array inside it (e.g. {path}/0)")
    axes = data.attrs.get("axes")
    return ImageFile(data, axes if isinstance(axes, str) else None, "zarr")


def _tiff_axes(letters: str) -> str | None:
    mapped = "".join(TIFF_AXES.get(a, "?") for a in letters.upper())
    if "?" in mapped or len(set(mapped)) != len(mapped) or not set(mapped) <= set(AXIS_LETTERS):
        return None
    return mapped


def _read_tiff(path: Path) -> ImageFile:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            missing_bytes = _tiff_missing_bytes(series)
            axes = _tiff_axes(series.axes)
            metadata = _tiff_metadata(tif)
            shape = tuple(series.shape)
            pages_tile_the_series = _page_dimension_count(series) is not None
    except (tifffile.TiffFileError, ValueError, IndexError, OSError) as error:
        # IndexError: tifffile found no image series, e.g. a TIFF header followed by garbage.
        raise ValueError(f"{path} is not a readable TIFF file ({error}); check that it is a complete TIFF") from error
    if missing_bytes:
        # An interrupted copy or download: refuse it now, not hours later when the missing planes come up.
        raise ValueError(f"{path} is truncated ({missing_bytes} bytes of image data are missing); copy or save it again")
    try:
        data = tifffile.memmap(path, mode="r")
        if data.shape != shape:
            raise ValueError("memmap shape differs from the series shape")
    except (ValueError, TypeError, OSError):
        # Compressed or tiled pages cannot be mapped: decode them one at a time on demand.
        # Only a series whose pages do not map onto its leading dimensions is read whole.
        data = LazyTiffArray(path) if pages_tile_the_series else tifffile.imread(path)
    return ImageFile(data, axes, "tiff", metadata)


def _tiff_metadata(tif) -> dict[str, Any]:
    """What an output should carry over from this input: pixel size, Z spacing, time step."""
    metadata: dict[str, Any] = {}
    if tif.is_imagej and tif.imagej_metadata:
        kept = {k: v for k, v in tif.imagej_metadata.items() if k in ("spacing", "unit", "finterval")}
        metadata["imagej"] = kept
    tags = tif.pages[0].tags
    if "XResolution" in tags and "YResolution" in tags:
        metadata["resolution"] = (tags["XResolution"].value, tags["YResolution"].value)
        if "ResolutionUnit" in tags:
            metadata["resolutionunit"] = int(tags["ResolutionUnit"].value)
    return metadata


def _tiff_missing_bytes(series) -> int:
    """How many bytes of the series' image data lie past the end of their file (0 if none).

    Only the end of the data is checked, where an interrupted copy or download cuts it. Each
    page is measured against its own file: a multi-file OME series spans several.
    """
    missing = 0
    if series.dataoffset is not None:  # one contiguous block, possibly listed as a single page
        missing = series.dataoffset + series.nbytes - series.parent.filehandle.size
    last_page = series.pages[-1] if len(series.pages) else None
    if last_page is not None and len(last_page.dataoffsets):
        data_end = max(offset + count for offset, count in zip(last_page.dataoffsets, last_page.databytecounts))
        missing = max(missing, data_end - last_page.parent.filehandle.size)
    return max(int(missing), 0)


def _page_dimension_count(series) -> int | None:
    """How many leading dimensions of the series index its pages, or None if the pages do not
    split the series shape that way (then it cannot be read page by page)."""
    shape = tuple(int(s) for s in series.shape)
    page_size = int(series.keyframe.size)
    if page_size == 0:
        return None
    size_inside_pages = 1
    for page_ndim in range(len(shape), -1, -1):
        if size_inside_pages == page_size:
            leading = shape[:page_ndim]
            return page_ndim if int(np.prod(leading, dtype=np.int64)) == len(series.pages) else None
        if page_ndim == 0 or size_inside_pages > page_size:
            return None
        size_inside_pages *= shape[page_ndim - 1]
    return None


def _normalised_index(index, size: int, axis: int) -> int | range:
    """An int index made non-negative and checked, or a slice as the range of positions it picks."""
    if isinstance(index, slice):
        return range(size)[index]
    if isinstance(index, (bool, np.bool_)):
        raise TypeError("boolean indices are not supported; read a block first with numpy.asarray(array[...])")
    try:
        position = operator.index(index)
    except TypeError:
        raise TypeError(
            f"only integers and slices index a lazy TIFF array, got {type(index).__name__}; "
            "read a block first with numpy.asarray(array[...])"
        ) from None
    if not -size <= position < size:
        raise IndexError(f"index {position} is out of bounds for axis {axis} with size {size}")
    return position % size


class LazyTiffArray:
    """A read-only array over the first series of a TIFF with compressed or tiled pages.

    Such pages cannot be memory-mapped, and reading the whole stack up front needs its full
    size in memory. Indexing decodes only the pages (planes) the index touches and cuts the
    in-page part from each, so a stack is read plane by plane. The leading dimensions index the
    pages; the trailing ones (Y, X, and samples) lie inside one page.

    The TIFF stays open for the life of the array; close() releases it earlier.
    """

    def __init__(self, path: str | os.PathLike):
        import tifffile

        self.path = Path(path)
        self._file = tifffile.TiffFile(self.path)
        try:
            series = self._file.series[0]
            self.shape: tuple[int, ...] = tuple(int(s) for s in series.shape)
            self.dtype = np.dtype(series.dtype)
            page_ndim = _page_dimension_count(series)
            if page_ndim is None:
                raise ValueError(
                    f"the pages of {self.path} do not divide its shape {self.shape}; read it whole with tifffile.imread"
                )
            self._pages = list(series.pages)
        except BaseException:
            self._file.close()
            raise
        self._page_ndim = page_ndim
        self._page_shape = self.shape[page_ndim:]
        # Pages share one file handle; seeking and reading must not interleave across threads.
        self._lock = threading.RLock()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d array")
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyTiffArray({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"

    def _full_key(self, key) -> tuple:
        """The index as one entry per dimension: Ellipsis expanded, missing trailing ones added."""
        key = key if isinstance(key, tuple) else (key,)
        ellipses = [i for i, k in enumerate(key) if k is Ellipsis]
        if len(ellipses) > 1:
            raise IndexError("an index can only have a single ellipsis ('...')")
        if ellipses:
            at = ellipses[0]
            key = key[:at] + (slice(None),) * (self.ndim - len(key) + 1) + key[at + 1 :]
        if len(key) > self.ndim:
            raise IndexError(f"too many indices: the array is {self.ndim}-dimensional, {len(key)} were given")
        return key + (slice(None),) * (self.ndim - len(key))

    def __getitem__(self, key) -> np.ndarray:
        key = self._full_key(key)
        picked = [_normalised_index(k, n, axis) for axis, (k, n) in enumerate(zip(key, self.shape))]
        page_picks, in_page_key = picked[: self._page_ndim], key[self._page_ndim :]
        in_page_key = tuple(k if isinstance(k, slice) else p for k, p in zip(in_page_key, picked[self._page_ndim :]))
        # The in-page result shape, from a zero-byte view of one page.
        in_page_shape = np.broadcast_to(np.zeros((), self.dtype), self._page_shape)[in_page_key].shape
        kept_shape = tuple(len(p) for p in page_picks if isinstance(p, range))
        result = np.empty(kept_shape + in_page_shape, self.dtype)
        # Per page dimension, (position in the result or None if indexed away, page index).
        choices = [list(enumerate(p)) if isinstance(p, range) else [(None, p)] for p in page_picks]
        page_dims = self.shape[: self._page_ndim]
        for combination in itertools.product(*choices):
            position = tuple(at for at, _ in combination if at is not None)
            page_number = 0
            for (_, index), size in zip(combination, page_dims):
                page_number = page_number * size + index
            result[position] = self._read_page(page_number)[in_page_key]
        return result

    def _read_page(self, page_number: int) -> np.ndarray:
        if self._file.filehandle.closed:
            raise ValueError(f"{self.path} was closed; open it again with read_image")
        page = self._pages[page_number]
        if page is None:  # a plane the file does not store (some OME series): tifffile reads it as zeros
            return np.zeros(self._page_shape, self.dtype)
        return page.asarray(lock=self._lock).reshape(self._page_shape)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if copy is False:
            raise ValueError("a lazy TIFF array is read from disk and cannot be viewed without a copy")
        whole = self[...]
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def close(self) -> None:
        file = getattr(self, "_file", None)  # absent if __init__ failed before opening
        if file is not None:
            file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


# -- writing ------------------------------------------------------------------------------


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
def open_output(path: str | os.PathLike, shape: tuple[int, ...], axes: str, like: ImageFile | None = None, *,
                resumable: bool = False, pyramid: int = 0, inputs=(), replace: bool = False) -> Iterator[Any]:
    """A writable float32 array that becomes `path` only if the block completes.

    A name ending in .ome.zarr makes an OME-Zarr image (the axes, physical scale and chunks of a
    zarr `like`; `pyramid` downsampled levels). `resumable` (zarr outputs): an interrupted
    block keeps its partial store, and the next call with the same path and shape reopens it.
    `inputs`: paths the caller reads from, which the output may not touch; `replace`: replace
    an existing zarr store even when napari-tbsn did not write it.
    """
    path = Path(path)
    check_output(path, inputs, replace=replace)
    suffix = path.suffix.lower()
    if resumable and suffix != ".zarr":
        raise ValueError(f"cannot resume {path.name}: a resumable output is a .zarr or .ome.zarr store")
    if pyramid and not is_ome_zarr_name(path):
        raise ValueError(f"a pyramid is written into OME-Zarr images only: name the output {path.stem}.ome.zarr")
    nbytes = output_bytes(shape, pyramid)
    check_room([(path, nbytes)])
    if suffix == ".zarr":
        yield from _zarr_output(path, shape, axes, like, resumable, pyramid)
        return
    with atomic_file(path) as temporary:
        with no_room_is_an_error(path.parent, nbytes):
            if suffix == ".npy":
                out = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float32, shape=tuple(shape))
            else:
                import tifffile

                big = np.prod(shape, dtype=np.int64) * 4 > 2**31
                out = tifffile.memmap(
                    temporary, shape=tuple(shape), dtype=np.float32, bigtiff=bool(big), **_tiff_options(axes, like)
                )
        try:
            reserve(temporary, os.path.getsize(temporary))
        except BaseException:
            del out
            raise
        yield out
        out.flush()
        del out


def output_bytes(shape: tuple[int, ...], pyramid: int = 0) -> int:
    """The uncompressed size of a float32 result of `shape`, its pyramid levels included."""
    level = int(np.prod(shape, dtype=np.int64)) * 4
    return level + sum(level // 4**k for k in range(1, pyramid + 1))


def _hidden_folder_beside(path: Path, role: str) -> Path:
    """A new empty folder `.{name}.{random}.{role}` beside `path`.

    Made with mode 0o777 so the umask applies (tempfile.mkdtemp would make it 0o700). The random
    part means a leftover from an earlier crash can never be in the way.
    """
    while True:
        folder = path.with_name(f".{path.name}.{secrets.token_hex(6)}.{role}")
        try:
            folder.mkdir(mode=0o777)
        except FileExistsError:
            continue
        return folder


def _replace_folder(new: Path, target: Path) -> None:
    """Put folder `new` at `target`, replacing whatever store is there; on failure the old
    store is back at `target` and `new` is untouched."""
    if not os.path.lexists(target):
        os.replace(new, target)
        return
    # A folder can only be renamed onto an empty folder, so the old store moves aside first.
    backup = _hidden_folder_beside(target, "old")
    try:
        os.replace(target, backup)
    except BaseException:
        backup.rmdir()
        raise
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _zarr_output(path: Path, shape: tuple[int, ...], axes: str, like: ImageFile | None, resumable: bool,
                 pyramid: int) -> Iterator[Any]:
    zarr = _import_zarr(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = output_chunks(shape, axes, like)
    with contextlib.ExitStack() as held:
        if resumable:
            # A fixed name, so that the next run finds what this one finished; locked, so that a
            # second run on the same output stops at once instead of writing into it too.
            temporary = path.with_name(f".{path.name}.resumable")
            temporary.mkdir(mode=0o777, exist_ok=True)
            held.enter_context(_locked(temporary, path))
            out = _reopened(temporary, shape, chunks)
            if out is None:
                _empty_folder(temporary)
            else:
                _write_attributes(temporary, out, shape, axes, like)  # this run's axes and scale, not the last one's
        else:
            temporary, out = _hidden_folder_beside(path, "partial"), None
        complete = False
        try:
            if out is None and is_ome_zarr_name(path):
                out = create_ome_zarr(temporary, shape, axes, chunks, like.metadata.get("ome") if like else None)
            elif out is None:
                # "w-": create inside the empty folder made above instead of deleting and remaking it.
                out = zarr.open_array(str(temporary), mode="w-", shape=tuple(shape), chunks=chunks, dtype="float32")
                out.attrs.update({"axes": axes, RESULT_MARKER: {"axes": axes}})
            yield out
            if pyramid:
                write_pyramid(temporary, pyramid)
            fsync_path(temporary)
            complete = True
            try:
                _replace_folder(temporary, path)
                fsync_folder(path.parent)
            except OSError as error:
                raise ValueError(
                    f"could not move the finished result into {path} ({error.strerror}); it is kept at "
                    f"{temporary}: rename that folder to {path.name} yourself"
                ) from error
        finally:
            # Any interruption before completion (Ctrl-C, SIGTERM, an error) removes the partial
            # store, unless it is resumable; a finished result that could not be moved into place
            # is kept, never deleted.
            if not complete and not resumable:
                shutil.rmtree(temporary, ignore_errors=True)


@contextlib.contextmanager
def _locked(folder: Path, output: Path) -> Iterator[None]:
    """Hold an exclusive lock on a file beside `folder` for the block; refuse at once if another
    run holds it. The kernel releases the lock when its holder dies, so a killed run never
    blocks the next. A regular file opened for writing, because NFS locks no other kind; a file
    system without locks gets a warning, and the run goes on."""
    import errno
    import warnings

    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        yield
        return
    lock = folder.with_name(f"{folder.name}.lock")
    descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    held = False
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            raise ValueError(f"another run is writing {output} now; wait for it to finish, "
                             "or write to another name") from None
        except OSError as error:
            if error.errno not in (errno.EBADF, errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            warnings.warn(f"the file system of {output} cannot lock files ({error.strerror}): make sure no other "
                          "run writes the same output", stacklevel=3)
        yield
    finally:
        if held:  # removed while still held, so no run ever waits on a file that is gone
            lock.unlink(missing_ok=True)
        os.close(descriptor)


def _empty_folder(folder: Path) -> None:
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _write_attributes(folder: Path, level, shape: tuple[int, ...], axes: str, like: ImageFile | None) -> None:
    """Give a reopened store the metadata this run would have written into a new one."""
    if level.path:  # level "0" of an OME-Zarr image
        rewrite_ome_metadata(folder, shape, axes, like.metadata.get("ome") if like else None)
    else:
        level.attrs.update({"axes": axes, RESULT_MARKER: {"axes": axes}})


def output_chunks(shape: tuple[int, ...], axes: str, like: ImageFile | None) -> tuple[int, ...]:
    """The input's chunks where it is a zarr store of this shape, else a plane (every channel) per chunk."""
    chunks = getattr(like.data, "chunks", None) if like is not None else None
    if like is not None and like.format in ("zarr", "ome-zarr") and chunks and len(chunks) == len(shape) \
            and tuple(like.data.shape) == tuple(shape):
        return tuple(int(c) for c in chunks)
    return tuple(s if a in "CYX" else 1 for a, s in zip(axes, shape))


def _reopened(folder: Path, shape: tuple[int, ...], chunks: tuple[int, ...]):
    """The float32 level-0 array of an earlier run's store at `folder`, if it matches."""
    if not folder.is_dir():
        return None
    import zarr

    for path in ("0", None):
        try:
            array = zarr.open_array(str(folder), path=path, mode="r+") if path else zarr.open_array(str(folder), mode="r+")
        except (ValueError, OSError, KeyError, TypeError):
            continue
        if tuple(array.shape) == tuple(shape) and tuple(array.chunks) == tuple(chunks) and array.dtype == np.float32:
            return array
    return None
