"""Which paths may be written (outputs.py), and the file-level faults every front end shares:
an output that touches an input, a store napari-tbsn did not write, a full disk, a kill -9
during a save, two runs on one output, and errors that are the user's vs. bugs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from napari_tbsn.cli import main
from napari_tbsn.image_io import open_output, read_image, release_pages
from napari_tbsn.outputs import RESULT_MARKER, ReplaceRefused, check_output, is_result_store, overlaps

from .conftest import noisy_image

zarr = pytest.importorskip("zarr")


def _user_store(path: Path) -> Path:
    zarr.open_array(str(path), mode="w", shape=(2, 16, 16), chunks=(1, 16, 16), dtype="float32")[:] = 1.0
    return path


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- an output never touches an input ---------------------------------------------------------


def test_overlaps_sees_the_same_path_inside_around_and_through_links(tmp_path):
    store = _user_store(tmp_path / "in.zarr")
    (tmp_path / "link.zarr").symlink_to(store, target_is_directory=True)
    (tmp_path / "a.tif").write_bytes(b"x")
    os.link(tmp_path / "a.tif", tmp_path / "hard.tif")
    assert overlaps(store, tmp_path / "in.zarr")
    assert overlaps(store / "0", store) and overlaps(tmp_path, store)
    assert overlaps(tmp_path / "link.zarr", store)
    assert overlaps(tmp_path / "hard.tif", tmp_path / "a.tif")
    assert not overlaps(tmp_path / "in2.zarr", store) and not overlaps(tmp_path / "b.tif", tmp_path / "a.tif")


def test_open_output_refuses_an_input_and_changes_nothing(tmp_path):
    store = _user_store(tmp_path / "in.zarr")
    before = _tree(tmp_path)
    for target in (store, tmp_path / "in.zarr" / "o.zarr"):
        with pytest.raises(ValueError, match="destroy the data being read"), \
                open_output(target, (2, 16, 16), "ZYX", inputs=[store], replace=True):
            pytest.fail("opened")
    assert _tree(tmp_path) == before


def test_a_store_napari_tbsn_did_not_write_is_replaced_only_when_asked(tmp_path):
    store = _user_store(tmp_path / "raw.zarr")
    before = _tree(store)
    with pytest.raises(ReplaceRefused, match="did not write"), open_output(store, (2, 16, 16), "ZYX"):
        pytest.fail("opened")
    assert _tree(store) == before and not is_result_store(store)
    with open_output(store, (2, 16, 16), "ZYX", replace=True) as out:
        out[:] = 2.0
    assert is_result_store(store)
    with open_output(store, (2, 16, 16), "ZYX") as out:  # our own result: replaced without asking
        out[:] = 3.0
    assert float(zarr.open_array(str(store), mode="r")[0, 0, 0]) == 3.0


def test_ome_zarr_results_carry_the_mark_too(tmp_path):
    pytest.importorskip("ome_zarr")
    target = tmp_path / "out.ome.zarr"
    with open_output(target, (2, 16, 16), "ZYX") as out:
        out[:] = 1.0
    assert is_result_store(target)
    check_output(target)  # replaced without a question


def test_cli_overwrite_replaces_a_users_store_and_never_an_input(tmp_path, fitted_tiny, capsys):
    model = fitted_tiny.save(tmp_path / "m.safetensors")
    np.save(tmp_path / "in.npy", noisy_image((64, 64))[1])
    store = _user_store(tmp_path / "old.zarr")
    argv = ["predict", str(tmp_path / "in.npy"), "--model", str(model), "-o", str(store), "--quiet"]
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert read_image(store).data.shape == (64, 64)
    in_store = _user_store(tmp_path / "in.zarr")
    before = _tree(in_store)
    assert main(["predict", str(in_store), "--model", str(model), "-o", str(in_store), "--overwrite", "--quiet",
                 "--axes", "ZYX"]) == 2
    assert _tree(in_store) == before


# -- full disks --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["out.tif", "out.npy", "out.zarr"])
def test_too_little_free_space_is_refused_before_any_work(tmp_path, monkeypatch, name):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    with pytest.raises(ValueError, match=r"needs 4\.1 KB but .* has 1.0 KB free"), \
            open_output(tmp_path / name, (4, 16, 16), "ZYX"):
        pytest.fail("opened")
    assert list(tmp_path.iterdir()) == []


def test_a_disk_that_fills_up_is_an_error_not_a_sigbus(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: the space of a memory-mapped output is reserved
    up front, so the write fails with a message instead of killing the process."""
    script = textwrap.dedent(f"""
        import resource, signal
        from napari_tbsn.image_io import open_output
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the file-size limit as an error, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
        for name in ("out.tif", "out.npy"):
            try:
                with open_output({str(tmp_path)!r} + "/" + name, (16, 256, 256), "ZYX") as out:
                    out[:] = 1.0
            except ValueError as error:
                print("refused:", error)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("refused: no room for 4.") == 2, done.stdout
    assert list(tmp_path.iterdir()) == []


# -- durable, whole files -------------------------------------------------------------------------


def test_outputs_and_models_reach_the_disk_before_their_rename(tmp_path, monkeypatch, fitted_tiny):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(f"replace {Path(b).name}"), real_replace(a, b))[1])
    fitted_tiny.save(tmp_path / "m.safetensors")
    with open_output(tmp_path / "o.zarr", (2, 8, 8), "ZYX") as out:
        out[:] = 1.0
    with open_output(tmp_path / "o.tif", (2, 8, 8), "ZYX") as out:
        out[:] = 1.0
    for target in ("m.safetensors", "o.zarr", "o.tif"):
        at = events.index(f"replace {target}")
        assert at > 0 and events[at - 1] == "fsync", (target, events)


def test_kill_9_during_a_model_save_keeps_the_old_model(tmp_path, fitted_tiny):
    from napari_tbsn import Denoiser

    path = fitted_tiny.save(tmp_path / "m.safetensors")
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import sys
        from napari_tbsn import Denoiser
        model = Denoiser.load({str(path)!r})
        print("ready", flush=True)
        while True:
            model.save({str(path)!r})
    """)
    saver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert saver.stdout.readline().strip() == "ready"
        time.sleep(1.5)  # dozens of saves
    finally:
        saver.send_signal(signal.SIGKILL)
        saver.wait(timeout=60)
    assert path.read_bytes() == before  # the same weights were saved each time; never a half file
    Denoiser.load(path)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "m.safetensors"]
    assert all(name.startswith(".m.safetensors.") and name.endswith(".partial") for name in leftovers), leftovers


# -- resumable outputs ------------------------------------------------------------------------------


def test_two_runs_on_one_resumable_output_the_second_stops_at_once(tmp_path):
    target = tmp_path / "out.zarr"
    with open_output(target, (2, 8, 8), "ZYX", resumable=True) as first:
        first[0] = 1.0
        with pytest.raises(ValueError, match="another run is writing"), \
                open_output(target, (2, 8, 8), "ZYX", resumable=True):
            pytest.fail("two runs wrote one output")
        first[1] = 2.0
    np.testing.assert_array_equal(zarr.open_array(str(target), mode="r")[:, 0, 0], [1.0, 2.0])


def test_a_resumed_ome_zarr_output_gets_this_runs_metadata(tmp_path):
    pytest.importorskip("ome_zarr")
    from napari_tbsn.image_io import ImageFile

    target = tmp_path / "out.ome.zarr"
    old = ImageFile(None, "ZYX", "napari", {"ome": {"scale": [1.0, 1.0, 1.0]}})
    new = ImageFile(None, "ZYX", "napari", {"ome": {"scale": [3.0, 0.5, 0.5]}})
    with pytest.raises(KeyboardInterrupt), open_output(target, (2, 8, 8), "ZYX", like=old, resumable=True) as out:
        out[0] = 5.0
        raise KeyboardInterrupt
    with open_output(target, (2, 8, 8), "ZYX", like=new, resumable=True) as out:
        assert float(out[0, 0, 0]) == 5.0
        out[1] = 6.0
    result = read_image(target)
    assert result.metadata["ome"]["scale"] == [3.0, 0.5, 0.5]
    attributes = json.loads((target / "zarr.json").read_text())["attributes"]
    assert RESULT_MARKER in attributes


def test_release_pages_keeps_the_edits_of_a_copy_on_write_map(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((64, 1024), np.float32))
    edited = np.load(tmp_path / "a.npy", mmap_mode="c")
    edited[:] = 7.0
    release_pages(edited)
    assert np.all(edited == 7.0)  # still in memory
    assert np.all(np.load(tmp_path / "a.npy") == 0.0)  # and never written to the file


# -- errors: the user's, or a bug --------------------------------------------------------------------


@pytest.fixture
def tiny_input(tmp_path):
    np.save(tmp_path / "in.npy", noisy_image((64, 64))[1])
    return tmp_path / "in.npy"


def test_a_bug_says_so_with_where_it_happened_and_exit_1(tiny_input, tmp_path, monkeypatch, capsys):
    from napari_tbsn import Denoiser

    def broken(self, *args, **kwargs):
        raise KeyError("a bug deep inside")

    monkeypatch.setattr(Denoiser, "fit_iter", broken)
    argv = ["denoise", str(tiny_input), "-o", str(tmp_path / "o.tif"), "--preset", "tiny", "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "this is a bug" in err and "KeyError" in err and "in broken" in err and "Traceback" not in err
    assert main([*argv, "--debug"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    monkeypatch.setenv("TBSN_DEBUG", "1")
    assert main(argv) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_debug_shows_the_traceback_of_a_user_error_too(tmp_path, capsys):
    assert main(["--debug", "denoise", str(tmp_path / "none.tif"), "-o", str(tmp_path / "o.tif")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("tbsn: error: no such file")


def test_out_of_memory_on_a_gpu_is_the_users_to_fix(tiny_input, tmp_path, monkeypatch, capsys):
    import torch

    from napari_tbsn import Denoiser

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Denoiser, "fit_iter", out_of_memory)
    assert main(["denoise", str(tiny_input), "-o", str(tmp_path / "o.tif"), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("tbsn: error: CUDA out of memory")


@pytest.mark.parametrize("module, argv, extra", [
    ("zarr", lambda f: ["denoise", str(f / "in.npy"), "-o", str(f / "o.zarr")], "zarr"),
    ("ome_zarr", lambda f: ["denoise", str(f / "in.npy"), "-o", str(f / "o.ome.zarr"), "--iterations", "1"], "zarr"),
    ("distributed", lambda f: ["predict", str(_user_store(f / "in.zarr")), "--model", str(f / "m.safetensors"),
                               "-o", str(f / "o.zarr"), "--workers", "1", "--axes", "ZYX"], "distributed"),
    ("bioimageio.spec", lambda f: ["export", str(f / "m.safetensors"), "-o", str(f / "m.bioimageio.zip")], "export"),
])
def test_a_missing_optional_package_names_the_extra(tiny_input, tmp_path, fitted_tiny, monkeypatch, capsys, module,
                                                    argv, extra):
    fitted_tiny.save(tmp_path / "m.safetensors")
    command = argv(tmp_path)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    before = _tree(tmp_path)
    assert main([*command, "--preset", "tiny", "--quiet"] if command[0] == "denoise" else [*command, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"napari-tbsn[{extra}]" in err[0], err
    assert _tree(tmp_path) == before


def test_the_cli_checks_the_room_for_its_outputs_before_the_fit(tiny_input, tmp_path, monkeypatch, capsys):
    import shutil

    from napari_tbsn import Denoiser

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=20_000))
    monkeypatch.setattr(Denoiser, "fit_iter", lambda *a, **k: pytest.fail("fitted before finding the disk full"))
    # 64x64 float32 is 16 KB: the result alone fits, the result and its uncertainty together do not.
    argv = ["denoise", str(tiny_input), "-o", str(tmp_path / "o.tif"), "--uncertainty", str(tmp_path / "sd.tif"),
            "--preset", "tiny", "--quiet"]
    assert main(argv) == 2
    assert "the result o.tif and sd.tif needs 32.8 KB" in capsys.readouterr().err


def test_a_resumed_output_needs_room_only_for_what_is_left(tmp_path, monkeypatch):
    import shutil

    target = tmp_path / "out.zarr"
    with pytest.raises(KeyboardInterrupt), open_output(target, (4, 64, 64), "ZYX", resumable=True) as out:
        out[:3] = np.random.default_rng(0).random((3, 64, 64), np.float32)  # incompressible, like real data
        raise KeyboardInterrupt
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=30_000))  # < 64 KB in all
    with open_output(target, (4, 64, 64), "ZYX", resumable=True) as out:
        out[3] = 2.0


@pytest.mark.parametrize("error, user, words", [
    (ModuleNotFoundError("No module named 'zarr'", name="zarr"), True, "napari-tbsn[zarr]"),
    (ImportError("cannot import name 'open_group' from 'zarr'", name="zarr"), True, "cannot import name"),
    (ImportError("libcudart.so.12: cannot open shared object file"), True, "libcudart"),
    (ModuleNotFoundError("No module named 'napari_tbsn.nope'", name="napari_tbsn.nope"), False, ""),
])
def test_failed_imports_keep_their_cause(error, user, words):
    from napari_tbsn.errors import is_user_error, one_line

    assert is_user_error(error) is user
    if user:
        assert words in one_line(error)


def test_a_cuda_index_the_machine_lacks_is_the_users_error(monkeypatch):
    import torch

    from napari_tbsn.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"has 1 CUDA GPU\(s\) \(cuda:0 to cuda:0\)"):
        resolve_device("cuda:3")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
