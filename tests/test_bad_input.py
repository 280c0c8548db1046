"""Bad input, tried as a new user would: through the CLI, the Denoiser and (in _napari/) the
widget. Each gives one line that says what to do (CLI: exit 2, no traceback), leaves every
input byte-identical, and leaves no partial or temporary file behind."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_tbsn import Denoiser
from napari_tbsn.axes import AXIS_LETTERS, PlaneLayout, check_array, parse_axes
from napari_tbsn.cli import main

from .conftest import noisy_image

FAST = ["--preset", "tiny", "--iterations", "2", "--device", "cpu"]


def _noisy(shape=(2, 64, 64), seed=0) -> np.ndarray:
    return noisy_image(shape, seed=seed)[1]


def _tif(folder: Path, data, name="in.tif", **options) -> Path:
    path = folder / name
    tifffile.imwrite(path, data, **options)
    return path


def _npy(folder: Path, data, name="in.npy") -> Path:
    path = folder / name
    np.save(path, data)
    return path


def _raw(folder: Path, content: bytes, name: str) -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    assert main(["fit", str(_tif(folder, _noisy())), "-o", str(folder / "m.safetensors"), *FAST, "--quiet"]) == 0
    return folder / "m.safetensors"


def _copy_model(folder: Path, model_file: Path, transform=lambda b: b, name="m.safetensors") -> Path:
    return _raw(folder, transform(model_file.read_bytes()), name)


def _foreign_safetensors(folder: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, str(folder / "foreign.safetensors"))
    return folder / "foreign.safetensors"


# Each row: (id, argv builder(folder, model_file) -> argv, words the one-line message must hold)
DENOISE = "denoise"
ROWS = [
    # files that are missing, empty, not images, truncated, or folders
    ("missing input", lambda f, m: [DENOISE, str(f / "nope.tif"), "-o", str(f / "o.tif")], "no such file"),
    ("empty tif", lambda f, m: [DENOISE, str(_raw(f, b"", "e.tif")), "-o", str(f / "o.tif")], "TIFF"),
    ("text as tif", lambda f, m: [DENOISE, str(_raw(f, b"hello" * 100, "t.tif")), "-o", str(f / "o.tif")], "TIFF"),
    ("truncated tif", lambda f, m: [DENOISE, str(_raw(f, _tif(f, _noisy(), "full.tif").read_bytes()[:3000],
                                                      "cut.tif")), "-o", str(f / "o.tif")], "truncated"),
    ("empty npy", lambda f, m: [DENOISE, str(_raw(f, b"", "e.npy")), "-o", str(f / "o.tif")], ".npy"),
    ("truncated npy", lambda f, m: [DENOISE, str(_raw(f, _npy(f, _noisy(), "full.npy").read_bytes()[:500],
                                                      "cut.npy")), "-o", str(f / "o.tif")], ".npy"),
    ("folder named x.tif", lambda f, m: [DENOISE, str(_mkdir(f / "x.tif")), "-o", str(f / "o.tif")], "folder"),
    ("unknown input format", lambda f, m: [DENOISE, str(_raw(f, b"x", "in.png")), "-o", str(f / "o.tif")], "png"),
    # every path the tool writes equal to an input or to another output
    ("-o is the input", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "in.tif")], "input path"),
    ("--save-model is the input", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"),
                                                "--save-model", str(f / "in.tif")], "input path"),
    ("--report is the input", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"),
                                            "--report", str(f / "in.tif")], "input path"),
    ("--uncertainty is the input", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"),
                                                 "--uncertainty", str(f / "in.tif")], "input path"),
    ("fit -o is the input", lambda f, m: ["fit", str(_tif(f, _noisy())), "-o", str(f / "in.tif")], "input path"),
    ("-o is --save-model", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"),
                                         "--save-model", str(f / "o.tif")], "output path"),
    ("--uncertainty is -o", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"),
                                          "--uncertainty", str(f / "o.tif")], "output path"),
    ("--report is -o", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"),
                                     "--report", str(f / "o.tif")], "output path"),
    ("predict -o is the model", lambda f, m: ["predict", str(_tif(f, _noisy())), "--model",
                                              str(_copy_model(f, m)), "-o", str(f / "m.safetensors")], "model path"),
    ("-o through a symlink to the input", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o",
                                                        str(_symlink(f / "link.tif", f / "in.tif"))], "input path"),
    ("-o inside the input store", lambda f, m: [DENOISE, str(_zarr(f / "in.zarr")), "-o", str(f / "in.zarr" / "o.zarr")],
     "destroy the data being read"),
    ("-o a store holding the input", lambda f, m: [DENOISE, str(_zarr(f / "all.zarr" / "in.zarr")), "-o",
                                                   str(f / "all.zarr")], "destroy the data being read"),
    ("-o a store napari-tbsn did not write", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o",
                                                          str(_zarr(f / "yesterday.zarr"))], "--overwrite"),
    ("--uncertainty a store napari-tbsn did not write", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o",
                                                                     str(f / "o.tif"), "--uncertainty",
                                                                     str(_zarr(f / "raw.zarr"))], "--overwrite"),
    ("-o an existing folder", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(_mkdir(f / "out"))], "folder"),
    ("-o unknown format", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.png")], "png"),
    ("sample -o a file", lambda f, m: ["sample", "-o", str(_raw(f, b"x", "file.txt"))], "folder"),
    # wrong, repeated or mismatched axes
    ("unknown axis letter", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"), "--axes", "ZYQ"],
     "unknown letters"),
    ("repeated axis", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"), "--axes", "YYX"],
     "repeats"),
    ("axes count", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"), "--axes", "YX"],
     "dimensions"),
    ("no X axis", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"), "--axes", "ZYC"], "Y and X"),
    ("context along C only", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"), "--axes", "CYX",
                                           "--context", "1"], "Z or T axis"),
    ("context too long for the stack", lambda f, m: [DENOISE, str(_tif(f, _noisy((3, 64, 64)))), "-o",
                                                     str(f / "o.tif"), "--axes", "ZYX", "--context", "2"],
     "at least 4 planes"),
    # too small, 1-D, no planes
    ("10x10", lambda f, m: [DENOISE, str(_tif(f, _noisy((10, 10)))), "-o", str(f / "o.tif")], "at least"),
    ("40x40", lambda f, m: [DENOISE, str(_tif(f, _noisy((40, 40)))), "-o", str(f / "o.tif")], "at least"),
    ("1xN", lambda f, m: [DENOISE, str(_npy(f, _noisy((1, 200)))), "-o", str(f / "o.tif"), "--axes", "YX"],
     "at least"),
    ("1-D", lambda f, m: [DENOISE, str(_npy(f, np.ones(100, np.float32))), "-o", str(f / "o.tif")], "1-dimensional"),
    ("1-D with axes", lambda f, m: [DENOISE, str(_npy(f, np.ones(100, np.float32))), "-o", str(f / "o.tif"),
                                    "--axes", "X"], "Y and X"),
    ("0 planes", lambda f, m: [DENOISE, str(_npy(f, np.ones((0, 64, 64), np.float32))), "-o", str(f / "o.tif")],
     "empty"),
    # values and types that cannot be denoised
    ("NaN", lambda f, m: [DENOISE, str(_npy(f, _with(_noisy(), np.nan))), "-o", str(f / "o.tif")], "NaN"),
    ("Inf", lambda f, m: [DENOISE, str(_npy(f, _with(_noisy(), np.inf))), "-o", str(f / "o.tif")], "infinite"),
    ("constant", lambda f, m: [DENOISE, str(_npy(f, np.full((64, 64), 7, np.float32))), "-o", str(f / "o.tif")],
     "constant"),
    ("all zero", lambda f, m: [DENOISE, str(_npy(f, np.zeros((2, 64, 64), np.uint16))), "-o", str(f / "o.tif")],
     "constant"),
    ("bool", lambda f, m: [DENOISE, str(_npy(f, np.ones((64, 64), bool))), "-o", str(f / "o.tif")], "dtype"),
    ("complex", lambda f, m: [DENOISE, str(_npy(f, np.ones((64, 64), np.complex64))), "-o", str(f / "o.tif")],
     "dtype"),
    # bad values of every option
    *[(f"--time-budget {value}", lambda f, m, value=value: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"),
                                                             "--time-budget", value], "time_budget")
      for value in ("nan", "inf", "0", "-1")],
    *[(f"--iterations {value}", lambda f, m, value=value: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"),
                                                            "--iterations", value], "iterations")
      for value in ("0", "-3")],
    *[(f"--{option} {value}", lambda f, m, option=option, value=value: [
        DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"), f"--{option}", value], option.replace("-", "_"))
      for option in ("patch-size", "batch-size", "tile-size") for value in ("0", "-64")],
    ("--refine -1 with pd 2", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"), "--pd", "2",
                                            "--refine", "-1"], "refine"),
    ("--uncertainty with the plain mean", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"),
                                                        "--estimator", "blind_spot", "--uncertainty", str(f / "u.tif")],
     "posterior"),
    ("--time-budget too short for one iteration", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o",
                                                                str(f / "o.tif"), "--time-budget", "1e-9"],
     "more time"),
    ("--pd 0", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"), "--pd", "0"], "pd"),
    ("--pd 9", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"), "--pd", "9"], "pd"),
    ("--context 4", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"), "--context", "4"],
     "context"),
    ("--context -1", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"), "--context", "-1"],
     "context"),
    ("--gain -1", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"), "--gain", "-1",
                                "--read-noise", "1"], "negative"),
    ("--gain nan", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"), "--gain", "nan",
                                 "--read-noise", "1"], "finite"),
    ("--gain alone", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"), "--gain", "2"],
     "--read-noise"),
    # dark frames that cannot describe the image's camera
    ("--dark of another size", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"), "--dark",
                                             str(_tif(f, _noisy((5, 32, 48)), "dark.tif"))], "dark frames are 32x48"),
    ("--dark with NaN", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"), "--dark",
                                      str(_tif(f, _with(_noisy((5, 64, 64)), np.nan), "dark.tif"))], "NaN"),
    ("--dark and --camera off", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"), "--dark",
                                              str(_tif(f, _noisy((5, 64, 64)), "dark.tif")), "--camera", "off"],
     "give one"),
    ("--dark missing", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"), "--dark",
                                     str(f / "none.tif")], "none.tif"),
    ("-o the dark frames", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(_tif(f, _noisy((5, 64, 64)),
                                                                                           "dark.tif")),
                                         "--dark", str(f / "dark.tif")], "dark"),
    # unknown or absent devices
    ("device gpu9", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"), "--device", "gpu9"],
     "device"),
    ("absent cuda", lambda f, m: [DENOISE, str(_tif(f, _noisy())), "-o", str(f / "o.tif"), "--device", "cuda:3"],
     "device"),
    # corrupt, truncated, foreign or wrong-channel model files
    ("missing model", lambda f, m: ["predict", str(_tif(f, _noisy())), "--model", str(f / "none.safetensors"),
                                    "-o", str(f / "o.tif")], "no model file"),
    ("truncated model", lambda f, m: ["predict", str(_tif(f, _noisy())), "--model",
                                      str(_copy_model(f, m, lambda b: b[: len(b) // 2])), "-o", str(f / "o.tif")],
     "truncated or corrupt"),
    ("garbage model", lambda f, m: ["predict", str(_tif(f, _noisy())), "--model",
                                    str(_raw(f, os.urandom(5000), "g.safetensors")), "-o", str(f / "o.tif")],
     "safetensors"),
    ("foreign safetensors", lambda f, m: ["predict", str(_tif(f, _noisy())), "--model", str(_foreign_safetensors(f)),
                                          "-o", str(f / "o.tif")], "not a napari-tbsn model"),
    ("an image as model", lambda f, m: ["predict", str(_tif(f, _noisy())), "--model", str(_tif(f, _noisy(), "x.tif")),
                                        "-o", str(f / "o.tif")], "safetensors"),
    ("wrong-channel model", lambda f, m: ["predict", str(_tif(f, _noisy((2, 64, 64)))), "--axes", "CYX", "--model",
                                          str(_copy_model(f, m)), "-o", str(f / "o.tif")], "channel"),
    ("model for too small data", lambda f, m: ["predict", str(_tif(f, _noisy((2, 32, 32)))), "--model",
                                               str(_copy_model(f, m)), "-o", str(f / "o.tif")], "at least"),
]


def _zarr(path: Path) -> Path:
    """A zarr store of the user's: one napari-tbsn did not write."""
    import zarr

    path.parent.mkdir(parents=True, exist_ok=True)
    zarr.open_array(str(path), mode="w", shape=(2, 64, 64), chunks=(1, 64, 64), dtype="float32")[:] = _noisy()
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _symlink(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def _with(data: np.ndarray, value: float) -> np.ndarray:
    data = data.copy()
    data[0, 5, 5] = value
    return data


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` and its hash (folders as such)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        found[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
    return found


@pytest.mark.parametrize("row", ROWS, ids=[row[0] for row in ROWS])
def test_bad_input_through_the_cli(row, model_file, tmp_path, capsys):
    name, build, words = row
    argv = build(tmp_path, model_file)
    if argv[0] != "sample":  # fast settings, where the row does not set them itself
        given = set(argv)
        for flag, value in zip(FAST[::2], FAST[1::2]):
            budget = flag == "--iterations" and "--time-budget" in given
            if flag not in given and not budget and (argv[0] != "predict" or flag == "--device"):
                argv += [flag, value]
        argv.append("--quiet")
    before = _snapshot(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (name, err)
    assert len(lines) == 1 and lines[0].startswith("tbsn: error: "), (name, err)
    assert "Traceback" not in err
    assert words.lower() in lines[0].lower(), (name, lines[0])
    assert _snapshot(tmp_path) == before, name  # inputs byte-identical, nothing written or left over


@pytest.mark.parametrize("argv, words", [
    (["denoise", "x.tif", "-o", "y.tif", "--iterations", "1.5"], "invalid int value"),
    (["denoise", "x.tif", "-o", "y.tif", "--pd", "x"], "auto"),
    (["denoise", "x.tif", "-o", "y.tif", "--ensemble", "3"], "choice"),
    (["denoise", "x.tif"], "required"),
])
def test_malformed_command_lines_say_what_is_wrong(argv, words, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert words in err.strip().splitlines()[-1]


@pytest.mark.parametrize("dtype, peak", [(np.uint8, 20), (np.int32, 20), (np.float16, 20), (np.uint16, 2)])
def test_integer_half_and_low_count_inputs_work(tmp_path, capsys, dtype, peak):
    _, noisy = noisy_image((64, 64), seed=3, peak=peak)
    path = _npy(tmp_path, np.clip(np.round(noisy), 0, None).astype(dtype))
    before = _snapshot(tmp_path)
    assert main(["denoise", str(path), "-o", str(tmp_path / "o.tif"), "--preset", "tiny", "--iterations", "2",
                 "--device", "cpu"]) == 0
    assert "inf dB" not in capsys.readouterr().err
    assert tifffile.imread(tmp_path / "o.tif").shape == (64, 64)
    assert {k: v for k, v in _snapshot(tmp_path).items() if k in before} == before


def test_an_rgb_tiff_is_three_channels(tmp_path):
    rgb = np.stack([noisy_image((64, 64), seed=s)[1] for s in range(3)], axis=-1).clip(0, 255).astype(np.uint8)
    path = _tif(tmp_path, rgb, photometric="rgb")
    assert main(["denoise", str(path), "-o", str(tmp_path / "o.tif"), *FAST, "--quiet"]) == 0
    assert tifffile.imread(tmp_path / "o.tif").shape == (64, 64, 3)


@pytest.mark.parametrize("data, axes, error, words", [
    (np.zeros((64, 64), np.complex64), "YX", TypeError, "dtype"),
    (np.zeros((64, 64), bool), "YX", TypeError, "dtype"),
    ([[1.0, 2.0]], "YX", TypeError, "array"),
    (np.full((64, 64), np.nan, np.float32), "YX", ValueError, "NaN"),
    (np.zeros((3, 64, 64), np.float32), "YX", ValueError, "dimensions"),
    (np.zeros((8, 8), np.float32), "YX", ValueError, "at least"),
    (np.zeros((0, 64, 64), np.float32), "ZYX", ValueError, "empty"),
    (np.zeros((64, 64), np.float32), "YX", ValueError, "constant"),
    (np.ones((64,), np.float32), "X", ValueError, "2D"),
])
def test_bad_input_through_the_denoiser(data, axes, error, words):
    with pytest.raises(error, match=words) as raised:
        Denoiser(preset="tiny", device="cpu").fit(data, axes, iterations=1)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("settings_, words", [
    ({"preset": "huge"}, "preset"), ({"pd": 0}, "pd"), ({"pd": 2.5}, "pd"), ({"context": 5}, "context"),
    ({"ensemble": 3}, "ensemble"), ({"refine": -1}, "refine"), ({"tile_size": 0}, "tile_size"),
    ({"predict_batch_size": 0}, "batch_size"), ({"estimator": "median"}, "estimator"), ({"device": "tpu"}, "device"),
    ({"seed": 1.5}, "seed"), ({"noise_model": (1, 2)}, "NoiseModel"),
])
def test_bad_settings_through_the_denoiser(settings_, words):
    with pytest.raises((ValueError, TypeError), match=words):
        Denoiser(**settings_)


# -- SIGINT and SIGTERM ------------------------------------------------------------------------
CLI = [sys.executable, "-c", "import sys; from napari_tbsn.cli import main; sys.exit(main())"]


def _signalled_run(argv: list[str], marker: str, signals: list[int], folder: Path) -> tuple[int, str]:
    """Run the CLI, wait for `marker` on its stderr (plus a second), then send `signals`."""
    process = subprocess.Popen([*CLI, *argv], stderr=subprocess.PIPE, text=True, cwd=folder)
    seen = ""
    deadline = time.monotonic() + 120
    while marker not in seen and time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        seen += line
    time.sleep(1.5)
    for number in signals:
        process.send_signal(number)
        time.sleep(0.3)
    rest = process.communicate(timeout=120)[1]
    return process.returncode, seen + rest


@pytest.fixture(scope="module")
def signal_inputs(tmp_path_factory, model_file):
    folder = tmp_path_factory.mktemp("signals")
    stack = np.stack([_noisy((256, 256), seed=s) for s in range(12)])
    tifffile.imwrite(folder / "in.tif", stack)
    (folder / "m.safetensors").write_bytes(model_file.read_bytes())
    return folder


@pytest.mark.parametrize("phase, signals, code", [
    ("fit", [signal.SIGTERM], 143),
    ("fit", [signal.SIGINT, signal.SIGINT], 130),
    ("predict", [signal.SIGTERM], 143),
    ("predict", [signal.SIGINT], 130),
])
def test_signals_stop_cleanly_and_leave_nothing_behind(signal_inputs, phase, signals, code):
    before = _snapshot(signal_inputs)
    if phase == "fit":
        argv = ["denoise", "in.tif", "-o", "o.tif", "--preset", "tiny", "--time-budget", "60", "--device", "cpu",
                "--save-model", "saved.safetensors", "--context", "0"]
        marker = "training:"
    else:
        argv = ["predict", "in.tif", "--model", "m.safetensors", "-o", "o.tif", "--ensemble", "8", "--device", "cpu"]
        marker = "denoising"
    returned, err = _signalled_run(argv, marker, signals, signal_inputs)
    assert returned == code, err
    assert "Traceback" not in err
    assert _snapshot(signal_inputs) == before  # input unchanged, no output, no hidden partial file


def test_one_ctrl_c_ends_the_fit_early_and_keeps_its_best_weights(signal_inputs):
    returned, err = _signalled_run(["fit", "in.tif", "-o", "early.safetensors", "--preset", "tiny", "--time-budget",
                                    "60", "--device", "cpu", "--context", "0"], "training:", [signal.SIGINT],
                                   signal_inputs)
    try:
        assert returned == 0, err
        assert "stopped early" in err
        model = Denoiser.load(signal_inputs / "early.safetensors")
        assert model.summary.stopped_early and model.uses_posterior  # completed after the training ended
    finally:
        (signal_inputs / "early.safetensors").unlink(missing_ok=True)


# -- generated axes, shapes and dtypes ---------------------------------------------------------
axes_strings = st.permutations(list(AXIS_LETTERS)).flatmap(
    lambda letters: st.integers(2, 6).map(lambda n: "".join(letters[:n])))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(axes=axes_strings, data=st.data())
def test_plane_layout_reads_and_writes_every_plane_back_in_place(axes, data):
    if "Y" not in axes or "X" not in axes:
        with pytest.raises(ValueError, match="Y and X"):
            parse_axes(axes, len(axes))
        return
    shape = tuple(data.draw(st.integers(1, 8 if letter in "ZT" else 3)) for letter in axes)
    layout = PlaneLayout.of(shape, axes)
    array = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    out = np.full(shape, -1, np.float32)
    for plane in layout.plane_indices():
        layout.write_plane(out, plane, layout.read_plane(array, plane))
    np.testing.assert_array_equal(out, array)
    assert layout.plane_count == len(list(layout.plane_indices()))
    assert len(layout.evenly_spaced(5)) == min(5, layout.plane_count)
    context = data.draw(st.integers(1, 3))
    if layout.context_axis is not None and layout.context_length() >= 2 * context:
        for plane in layout.plane_indices():
            block = layout.read_plane_with_context(array, plane, context)
            own = layout.read_plane(array, plane)
            # No neighbour is the plane itself.
            for index in range(1, 2 * context + 1):
                neighbour = block[index * layout.channels : (index + 1) * layout.channels]
                assert not np.array_equal(neighbour, own)


@settings(max_examples=100, deadline=None)
@given(dtype=st.sampled_from([np.bool_, np.uint8, np.int16, np.int64, np.float16, np.float64, np.complex64, object,
                              "U3"]),
       shape=st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple))
def test_the_input_check_accepts_real_arrays_and_explains_the_rest(dtype, shape):
    array = np.zeros(shape, dtype=dtype)
    real = np.dtype(dtype).kind in "uif"
    if real and len(shape) >= 2 and 0 not in shape:
        check_array(array)
        return
    with pytest.raises((TypeError, ValueError)) as raised:
        check_array(array)
    assert "\n" not in str(raised.value)
