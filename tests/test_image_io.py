import io
import os
import pickle
import stat
import sys

import numpy as np
import pytest
import tifffile

from napari_tbsn.image_io import LazyTiffArray, open_output, read_image
from napari_tbsn.outputs import check_writable
from napari_tbsn.model_io import atomic_file, write_text_atomic


def stack(shape=(3, 40, 50), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


@pytest.fixture
def umask():
    """Set the process umask for one test and put the old one back afterwards."""
    previous = os.umask(0o022)  # reading the umask means setting it; the test sets its own
    yield os.umask
    os.umask(previous)


@pytest.fixture
def page_reads(monkeypatch):
    """The indices of the TIFF pages decoded while the test runs (a set: a TiffFrame decodes
    through TiffPage.asarray, so one read can pass through both)."""
    indices = set()
    for kind in (tifffile.TiffPage, tifffile.TiffFrame):
        original = kind.asarray

        def counting(self, *args, _original=original, **kwargs):
            indices.add(self.index)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(kind, "asarray", counting)
    return indices


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- compressed and tiled TIFFs are read lazily ---------------------------------------------


@pytest.mark.parametrize("layout", [{"compression": "zlib"}, {"tile": (16, 16)}], ids=["zlib", "tiled"])
def test_compressed_or_tiled_tiff_is_read_lazily(tmp_path, layout):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack(), photometric="minisblack", **layout)
    expected = tifffile.imread(path)
    data = read_image(path).data
    assert isinstance(data, LazyTiffArray)
    assert data.shape == expected.shape and data.dtype == expected.dtype and data.ndim == 3
    for key in [1, -1, (0,), (2, slice(None), 5), (slice(None), 3), (slice(None, None, -2), slice(4, 20), -7),
                (slice(1, 3), Ellipsis, slice(0, 10)), Ellipsis, (-3, -1, -1), slice(5, 1)]:
        np.testing.assert_array_equal(data[key], expected[key], err_msg=f"index {key!r}")
    np.testing.assert_array_equal(np.asarray(data), expected)
    with pytest.raises(IndexError):
        data[3]
    with pytest.raises(IndexError):
        data[0, 0, 0, 0]


def test_reading_one_plane_decodes_only_that_page(tmp_path, page_reads):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack(), photometric="minisblack", compression="zlib")
    data = read_image(path).data
    page_reads.clear()
    data[1]
    assert page_reads == {1}
    page_reads.clear()
    data[2, 10:20, 3]
    assert page_reads == {2}


def test_lazy_tiff_maps_leading_dimensions_to_pages(tmp_path, page_reads):
    path = tmp_path / "hyperstack.tif"
    expected = stack((2, 3, 2, 16, 24))
    tifffile.imwrite(path, expected, imagej=True, compression="zlib", metadata={"axes": "TZCYX"})
    image = read_image(path)
    assert image.axes == "TZCYX" and isinstance(image.data, LazyTiffArray)
    page_reads.clear()
    np.testing.assert_array_equal(image.data[1, 2, :, ::2], expected[1, 2, :, ::2])
    assert page_reads == {10, 11}  # (t=1, z=2) holds pages 1*6 + 2*2 + {0, 1}
    np.testing.assert_array_equal(image.data[:, -1, 0], expected[:, -1, 0])


def test_lazy_tiff_closes_its_file(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack(), photometric="minisblack", compression="zlib")
    data = LazyTiffArray(path)
    data.close()
    with pytest.raises(ValueError, match="closed"):
        data[0]


def test_uncompressed_tiff_is_still_memory_mapped(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack(), photometric="minisblack")
    assert isinstance(read_image(path).data, np.memmap)


# -- outputs follow the umask ---------------------------------------------------------------


@pytest.mark.parametrize("mask, expected_mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mask, expected_mode):
    umask(mask)
    for name in ("out.tif", "out.npy"):
        with open_output(tmp_path / name, (2, 16, 16), "ZYX") as out:
            out[:] = 1
        assert mode_of(tmp_path / name) == expected_mode, name
    write_text_atomic(tmp_path / "report.json", "{}")
    assert mode_of(tmp_path / "report.json") == expected_mode
    with atomic_file(tmp_path / "model.safetensors") as temporary:
        temporary.write_bytes(b"weights")
    assert mode_of(tmp_path / "model.safetensors") == expected_mode


def test_written_zarr_store_follows_the_umask(tmp_path, umask):
    pytest.importorskip("zarr")
    umask(0o022)
    with open_output(tmp_path / "out.zarr", (2, 16, 16), "ZYX") as out:
        out[:] = 1
    assert mode_of(tmp_path / "out.zarr") == 0o755


def test_temporary_files_are_hidden_and_unique(tmp_path):
    with atomic_file(tmp_path / "a.tif") as first, atomic_file(tmp_path / "a.tif") as second:
        assert first != second
        for temporary in (first, second):
            assert temporary.parent == tmp_path
            assert temporary.name.startswith(".a.tif.") and temporary.name.endswith(".partial")
        second.write_text("second")
        first.write_text("first")
    assert (tmp_path / "a.tif").read_text() == "first"  # the outer block finishes last, so it wins
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif"]


# -- replacing a zarr store -----------------------------------------------------------------


def test_zarr_output_ignores_a_stale_backup_folder(tmp_path):
    zarr = pytest.importorskip("zarr")
    target = tmp_path / "out.zarr"
    with open_output(target, (2, 8, 8), "ZYX") as out:
        out[:] = 1
    stale = tmp_path / ".out.zarr.old"
    stale.mkdir()
    (stale / "leftover").write_text("from a crash")
    with open_output(target, (2, 8, 8), "ZYX") as out:
        out[:] = 2
    np.testing.assert_array_equal(zarr.open(str(target), mode="r")[:], np.full((2, 8, 8), 2, np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.zarr.old", "out.zarr"]


def test_finished_zarr_output_is_kept_when_it_cannot_be_moved_into_place(tmp_path, monkeypatch):
    zarr = pytest.importorskip("zarr")
    from napari_tbsn import image_io

    target = tmp_path / "out.zarr"

    def refuse_to_move(new, destination):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(image_io, "_replace_folder", refuse_to_move)
    with pytest.raises(ValueError, match="kept at"), open_output(target, (2, 8, 8), "ZYX") as out:
        out[:] = 2
    (kept,) = tmp_path.iterdir()
    assert kept.name.endswith(".partial")
    assert float(zarr.open(str(kept), mode="r")[1, 0, 0]) == 2


# -- clear errors for bad inputs ------------------------------------------------------------


def npy_bytes() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, stack((4, 32, 32)))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.npy", b"", "empty"),
        ("short_header.npy", npy_bytes()[:40], "not a readable .npy"),
        ("short_data.npy", npy_bytes()[:1000], "truncated"),
        ("pickled.npy", pickle.dumps({"not": "an image"}), "not a readable .npy"),
        ("text.tif", b"this is a text file, not an image", "not a readable TIFF"),
        ("empty.tif", b"", "not a readable TIFF"),
        ("garbage.tif", b"II*\x00" + bytes(range(200)), "not a readable TIFF"),
    ],
)
def test_unreadable_file_gives_a_one_line_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_image(path)


def test_object_array_npy_is_refused(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="Python objects"):
        read_image(path)


def test_npz_archive_named_npy_is_refused(tmp_path):
    path = tmp_path / "archive.npy"
    with open(path, "wb") as file:
        np.savez(file, image=stack())
    with pytest.raises(ValueError, match="npz archive"):
        read_image(path)


@pytest.mark.parametrize("layout", [{}, {"compression": "zlib"}], ids=["plain", "zlib"])
def test_truncated_tiff_is_refused(tmp_path, layout):
    whole, cut = tmp_path / "whole.tif", tmp_path / "cut.tif"
    tifffile.imwrite(whole, stack((5, 40, 50)), photometric="minisblack", **layout)
    cut.write_bytes(whole.read_bytes()[:-100])  # the end of the last plane's data is missing
    with pytest.raises(ValueError, match="is truncated|complete TIFF"):
        read_image(cut)


@pytest.mark.parametrize("name", ["x.tif", "x.npy"])
def test_folder_named_like_a_file_is_refused_as_input(tmp_path, name):
    (tmp_path / name).mkdir()
    with pytest.raises(ValueError, match="is a folder, not a file"):
        read_image(tmp_path / name)


def test_zero_length_dimension_can_be_read(tmp_path):
    np.save(tmp_path / "empty_stack.npy", np.zeros((0, 8, 8), np.float32))
    assert read_image(tmp_path / "empty_stack.npy").data.shape == (0, 8, 8)


# -- clear errors for bad outputs -----------------------------------------------------------


@pytest.mark.parametrize("name", ["results", "x.tif", "x.npy"])
def test_output_that_is_a_folder_is_refused_before_writing(tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    with pytest.raises(ValueError, match="is a folder; give a file name such as"):
        check_writable(folder)
    with pytest.raises(ValueError, match="is a folder"), open_output(folder, (8, 8), "YX"):
        pytest.fail("open_output should refuse before the block runs")
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("below", ["out.tif", "deeper/out.tif"])
def test_output_below_a_file_is_refused(tmp_path, below):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    target = tmp_path / "notes.txt" / below
    with pytest.raises(ValueError, match="notes.txt is a file, not a folder"):
        check_writable(target)
    with pytest.raises(ValueError, match="is a file, not a folder"), open_output(target, (8, 8), "YX"):
        pass
    with pytest.raises(ValueError, match="cannot create the folder"):
        write_text_atomic(target, "{}")


def test_unknown_output_suffix_is_refused(tmp_path):
    with pytest.raises(ValueError, match="use a .tif/.tiff, .npy or .zarr name"):
        check_writable(tmp_path / "out.png")


def test_check_writable_creates_nothing(tmp_path):
    for name in ("out.tif", "new/folders/out.npy", "out.zarr"):
        check_writable(tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_zarr_needs_the_zarr_package(tmp_path, monkeypatch):
    store = tmp_path / "in.zarr"
    store.mkdir()
    monkeypatch.setitem(sys.modules, "zarr", None)  # `import zarr` now fails as if not installed
    with pytest.raises(ValueError, match=r"napari-tbsn\[zarr\]"):
        check_writable(tmp_path / "out.zarr")
    with pytest.raises(ValueError, match=r"napari-tbsn\[zarr\]"):
        read_image(store)
    with pytest.raises(ValueError, match=r"napari-tbsn\[zarr\]"), open_output(tmp_path / "out.zarr", (8, 8), "YX"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr"]


def test_folder_that_is_not_a_zarr_store_is_not_replaced(tmp_path):
    pytest.importorskip("zarr")
    folder = tmp_path / "precious.zarr"
    folder.mkdir()
    (folder / "data.txt").write_text("not zarr")
    with pytest.raises(ValueError, match="not a zarr store"):
        check_writable(folder)
    assert (folder / "data.txt").read_text() == "not zarr"


# -- interrupted writes leave nothing behind ------------------------------------------------


@pytest.mark.parametrize("name", ["out.tif", "out.npy", "out.zarr"])
@pytest.mark.parametrize("interruption", [KeyboardInterrupt, SystemExit])
def test_interrupted_write_leaves_no_files(tmp_path, name, interruption):
    if name.endswith(".zarr"):
        pytest.importorskip("zarr")
    (tmp_path / "input.tif").write_bytes(b"untouched")
    with pytest.raises(interruption), open_output(tmp_path / name, (2, 16, 16), "ZYX") as out:
        out[0] = 1
        raise interruption()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.tif"]


def test_interrupted_write_keeps_the_previous_output(tmp_path):
    target = tmp_path / "out.npy"
    np.save(target, np.full((8, 8), 7, np.float32))
    with pytest.raises(KeyboardInterrupt), open_output(target, (8, 8), "YX") as out:
        out[:] = 1
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npy"]
    assert float(np.load(target)[0, 0]) == 7
