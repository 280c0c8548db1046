"""The bioimage.io export of a distilled student, checked with the zoo's own runtime (bioimageio.core).

The students here are untrained UNets attached to briefly fitted models: the export only needs
a network and a normalisation. Their output layer is scaled up so that the residual correction
is of the order of the data's range (every input channel, context included, then shows in the
output), and a wrong normalisation, channel order or weight format shows. No test may touch
the network.
"""

from __future__ import annotations

import dataclasses
import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("bioimageio.core")

from bioimageio.core import create_prediction_pipeline, load_description, predict
from bioimageio.core import test_model as zoo_model_test  # renamed: pytest would collect `test_model`

from napari_tbsn import Denoiser
from napari_tbsn.axes import PlaneLayout
from napari_tbsn.bioimageio import export_bioimageio
from napari_tbsn.network.unet import UNet, ZooUNet, student_preset
from napari_tbsn.student import Student

from .conftest import noisy_image

WEIGHT_FORMATS = ("pytorch_state_dict", "torchscript")


@pytest.fixture(autouse=True, scope="module")
def no_network():
    """Every connection and name lookup fails, and is recorded: the export and the zoo's
    checks of the package must need neither."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "getaddrinfo", refuse)
        yield attempts
    assert not attempts, f"network access was attempted: {attempts}"


def with_student(model, seed=0):
    torch.manual_seed(seed)
    k, channels = model.context_planes, model.channels
    network = UNet(student_preset("tiny", channels * (1 + 2 * k), channels)).eval()
    with torch.no_grad():  # a correction of the order of the data's range, not a few per cent of it
        network.output.weight.mul_(20.0)
        network.output.bias.mul_(20.0)
    return dataclasses.replace(model, student=Student(network))


def student_output(model, plane: np.ndarray, halo: int = 0) -> np.ndarray:
    """The student on a (C_in, H, W) plane in input units, normalised as the brief defines it
    (context channel j uses channel j % C), de-normalised back: the reference for the zoo.
    `halo`: first mirror the plane by that many pixels (numpy's "reflect", the package's `pad`)
    and crop them from the output, as zoo tools do with the package's halo."""
    low, high = np.asarray(model.normalizer.low), np.asarray(model.normalizer.high)
    index = np.arange(plane.shape[0]) % model.channels
    normalised = (plane - low[index, None, None]) / (high - low)[index, None, None]
    normalised = np.pad(normalised, ((0, 0), (halo, halo), (halo, halo)), mode="reflect")
    with torch.no_grad():
        out = model.student.network(torch.from_numpy(normalised[None].astype(np.float32)))[0].double().numpy()
    out = out[:, halo : out.shape[1] - halo, halo : out.shape[2] - halo]
    return out * (high - low)[:, None, None] + low[:, None, None]


def zoo_output(package: Path, plane: np.ndarray, weight_format: str, blocksize: int | None = None) -> np.ndarray:
    """bioimageio.core's prediction of a (C_in, H, W) plane (any dtype: the package casts it) with
    one weight format: whole, or in blocks of the input size parameter n = `blocksize`."""
    pipeline = create_prediction_pipeline(load_description(package), weight_format=weight_format, devices=["cpu"])
    # predict() loads and unloads the pipeline itself: wrapping it in `with pipeline` as well
    # unloads twice, and bioimageio.core 0.11 then waits forever on its empty model queue.
    sample = predict(model=pipeline, inputs=plane[None], blocksize_parameter=blocksize)
    (tensor,) = sample.members.values()
    return np.asarray(tensor.data, dtype=np.float64)[0]


def assert_close(actual, expected, relative=1e-4):
    """Equal to `relative` of each value, or of the output's magnitude for values near zero."""
    tolerance = relative * (np.abs(expected) + np.abs(expected).max())
    worst = np.max(np.abs(actual - expected) - tolerance)
    assert actual.shape == expected.shape
    assert worst <= 0, f"differs by up to {np.max(np.abs(actual - expected)):.3g}"


def passed_weight_formats(summary) -> set[str]:
    """The weight formats whose test outputs bioimageio.core reproduced."""
    formats = set()
    for detail in summary.details:
        for weight_format in WEIGHT_FORMATS:
            if detail.name == f"Reproduce test outputs from test inputs ({weight_format})" and detail.status == "passed":
                formats.add(weight_format)
    return formats


def read_npy(package: Path, name: str) -> np.ndarray:
    import io

    with zipfile.ZipFile(package) as archive:
        return np.load(io.BytesIO(archive.read(name)))


@pytest.fixture(scope="module")
def plane_model(device):
    """A tiny YX model (one channel, no context) with an untrained student, and its data."""
    _, noisy = noisy_image((128, 128))
    fitted = Denoiser(preset="tiny", pd=2, device=device, seed=0).fit(noisy, "YX", iterations=1).model
    return with_student(fitted), noisy


@pytest.fixture(scope="module")
def plane_package(plane_model, tmp_path_factory):
    model, noisy = plane_model
    sample = np.pad(noisy, ((70, 80), (60, 70)), mode="reflect")[np.newaxis]  # 278 x 258: the centre 256 x 256 goes
    path = tmp_path_factory.mktemp("plane") / "student.zip"
    assert export_bioimageio(model, path, sample, name="test student", authors=["A. Tester"]) == path
    return path


def test_refuses_a_model_without_a_student(plane_model, tmp_path):
    model, noisy = plane_model
    with pytest.raises(ValueError) as error:
        export_bioimageio(dataclasses.replace(model, student=None), tmp_path / "m.zip", noisy[None])
    assert str(error.value) == (
        "this model has no distilled student: distil it first (Denoiser.distil, `tbsn distil`, or the widget's "
        "student option); the blind-spot teacher with its posterior and R3 cannot be run faithfully by zoo tools")
    assert "\n" not in str(error.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("change, match", [
    ({"path": "student.bioimageio"}, r"does not end in \.zip"),
    ({"sample": None}, "no sample"),
    ({"sample": np.zeros((2, 64, 64), np.float32)}, "1 channel"),
    ({"sample": np.zeros((1, 8, 64), np.float32)}, "at least 16x16"),
    ({"sample": np.full((1, 64, 64), np.nan, np.float32)}, "NaN"),
    ({"license": "not-a-licence"}, "SPDX"),
    ({"name": "bad/name"}, "model name"),
    ({"authors": ["a/b"]}, "author"),
])
def test_refuses_bad_arguments_in_one_line(plane_model, tmp_path, change, match):
    model, noisy = plane_model
    arguments = {"path": "student.zip", "sample": noisy[None], **change}
    path = tmp_path / arguments.pop("path")
    sample = arguments.pop("sample")
    with pytest.raises(ValueError, match=match) as error:
        export_bioimageio(model, path, sample, **arguments)
    assert "\n" not in str(error.value)
    assert not list(tmp_path.iterdir())


def test_names_the_fix_for_a_spec_that_pydantic_2_14_breaks(plane_model, tmp_path, monkeypatch):
    import bioimageio.spec
    import pydantic

    model, noisy = plane_model
    monkeypatch.setattr(bioimageio.spec, "__version__", "0.5.12.0")
    monkeypatch.setattr(pydantic, "VERSION", "2.14.4")
    with pytest.raises(RuntimeError, match=r"pydantic<2\.14"):
        export_bioimageio(model, tmp_path / "student.zip", noisy[None])
    assert not list(tmp_path.iterdir())


def test_package_passes_the_zoo_model_test_with_both_weight_formats(plane_package):
    summary = zoo_model_test(plane_package)
    assert summary.status == "passed", summary.format()
    assert passed_weight_formats(summary) == set(WEIGHT_FORMATS), summary.format()


def test_package_holds_the_centre_crop_and_the_student_output(plane_model, plane_package):
    model, noisy = plane_model
    test_input = read_npy(plane_package, "test_input.npy")
    # The centre 256 x 256, mirrored by the 128-pixel halo: the network's input in a zoo tool.
    assert test_input.dtype == np.float32 and test_input.shape == (1, 1, 512, 512)
    sample = np.pad(noisy, ((70, 80), (60, 70)), mode="reflect")
    np.testing.assert_array_equal(test_input[0, 0], np.pad(sample[11:267, 1:257], 128, mode="reflect"))
    test_output = read_npy(plane_package, "test_output.npy")
    assert test_output.dtype == np.float32 and test_output.shape == (1, 1, 512, 512)
    assert_close(test_output[0].astype(np.float64), student_output(model, test_input[0]))
    with zipfile.ZipFile(plane_package) as archive:
        names = set(archive.namelist())
        readme = archive.read("README.md").decode()
    assert {"rdf.yaml", "weights.pt", "weights_torchscript.pt", "cover.png", "README.md"} <= names
    assert "2404.07846" in readme and "not a general denoiser" in readme


@pytest.mark.parametrize("weight_format", WEIGHT_FORMATS)
def test_zoo_runtime_gives_the_student_output(plane_model, plane_package, weight_format):
    model, noisy = plane_model
    halo = model.student.config.margin
    test_input = read_npy(plane_package, "test_input.npy")[0]
    assert_close(zoo_output(plane_package, test_input, weight_format), student_output(model, test_input, halo))
    # A whole plane, not square, of another size the package accepts (272 + n x 16).
    plane = np.pad(noisy, ((80, 80), (96, 96)), mode="reflect")[np.newaxis]
    assert plane.shape == (1, 288, 320)
    assert_close(zoo_output(plane_package, plane, weight_format), student_output(model, plane, halo))


def test_package_declares_the_student_margin_as_halo_and_casts_first(plane_model, plane_package):
    import ruyaml  # bioimageio.spec's YAML library

    config = plane_model[0].student.config
    # The tiny student: a 120-pixel receptive radius, on its 16-pixel grid.
    assert (config.radius, config.margin, config.size_multiple) == (120, 128, 16)
    descr = load_description(plane_package)
    spatial = [axis for axis in descr.outputs[0].axes if axis.type == "space"]
    assert [(axis.id, axis.halo) for axis in spatial] == [("y", 128), ("x", 128)]
    sizes = [axis.size for axis in descr.inputs[0].axes if axis.type == "space"]
    assert [(size.min, size.step) for size in sizes] == [(2 * 128 + 16, 16)] * 2
    assert descr.inputs[0].pad.mode == "reflect"
    # Declared in the file itself, not only added by the spec library when it reads one.
    with zipfile.ZipFile(plane_package) as archive:
        rdf = ruyaml.YAML(typ="safe").load(archive.read("rdf.yaml"))
    first, *_ = rdf["inputs"][0]["preprocessing"]
    assert first == {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}
    assert rdf["inputs"][0]["pad"] == {"mode": "reflect"}


@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_blockwise_prediction_gives_the_whole_plane_output(plane_model, plane_package, dtype):
    """bioimageio.core cuts blocks that keep 64 x 64 pixels (n = 3: 272 + 3 x 16 = 320 pixels
    with the halo), 6 x 5 of them on a 384 x 320 plane (a size the package accepts, so every
    block starts on the 16-pixel grid); a uint16 plane is cast by the package. The blocks run
    the same arithmetic on the same pixels as the whole plane, on tensors of other sizes, so
    only float32 rounding may differ: 1e-5 of the output's range allows for it, and is far
    below the seams of blocks without the halo (about 1% of the range here)."""
    model, _ = plane_model
    _, noisy = noisy_image((384, 320), seed=5)
    photons = np.clip(np.round(noisy), 0, None)  # whole numbers, as a camera gives
    whole = zoo_output(plane_package, photons[np.newaxis].astype(np.float32), "torchscript")
    assert_close(whole, student_output(model, photons[np.newaxis], model.student.config.margin))
    blocks = zoo_output(plane_package, photons[np.newaxis].astype(dtype), "torchscript", blocksize=3)
    assert_close(blocks, whole, relative=1e-5)


def test_state_dict_architecture_is_the_student(plane_model):
    model, _ = plane_model
    config = model.student.config
    zoo = ZooUNet(config.width, config.depth, config.shuffle, config.in_channels, config.out_channels)
    zoo.load_state_dict(model.student.network.state_dict(), strict=True)
    x = torch.rand(1, config.in_channels, 40, 56)
    with torch.no_grad():
        assert torch.equal(zoo.eval()(x), model.student.network(x))


def test_failed_export_keeps_the_previous_file(plane_model, tmp_path, monkeypatch):
    from napari_tbsn import bioimageio

    model, noisy = plane_model
    path = tmp_path / "student.zip"
    path.write_bytes(b"previous")

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(bioimageio.shutil, "copyfile", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_bioimageio(model, path, noisy[None])
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["student.zip"]


@pytest.fixture(scope="module")
def context_model(device):
    """Two channels and one context plane on each side: six input channels (context channel j
    is channel j % 2), with an untrained student, and the Z C Y X data."""
    _, noisy = noisy_image((4, 2, 128, 128), seed=3)
    fitted = Denoiser(preset="tiny", pd=2, device=device, seed=0, context=1).fit(noisy, "ZCYX", iterations=1).model
    model = with_student(fitted, seed=1)
    assert (model.channels, model.context_planes, model.student.config.in_channels) == (2, 1, 6)
    return model, noisy


@pytest.fixture(scope="module")
def context_package(context_model, tmp_path_factory):
    model, noisy = context_model
    plane = PlaneLayout.of(noisy.shape, "ZCYX").read_plane_with_context(noisy, (1,), 1)  # plane, then -1, +1
    np.testing.assert_array_equal(plane, np.concatenate([noisy[1], noisy[0], noisy[2]]))
    return export_bioimageio(model, tmp_path_factory.mktemp("context") / "context.zip", plane)


def test_channels_with_context_planes_pass_the_zoo_model_test(context_package):
    summary = zoo_model_test(context_package)
    assert summary.status == "passed", summary.format()
    assert passed_weight_formats(summary) == set(WEIGHT_FORMATS), summary.format()


def test_context_channels_repeat_the_channels_scaling(context_model, context_package):
    model, _ = context_model
    descr = load_description(context_package)
    (scale_linear,) = [p for p in descr.inputs[0].preprocessing if p.id == "scale_linear"]
    low, high = np.asarray(model.normalizer.low), np.asarray(model.normalizer.high)
    np.testing.assert_allclose(scale_linear.kwargs.gain, np.tile(1 / (high - low), 3), rtol=1e-12)
    np.testing.assert_allclose(scale_linear.kwargs.offset, np.tile(-low / (high - low), 3), rtol=1e-12)
    (unscale,) = [p for p in descr.outputs[0].postprocessing if p.id == "scale_linear"]
    np.testing.assert_allclose(unscale.kwargs.gain, high - low, rtol=1e-12)
    np.testing.assert_allclose(unscale.kwargs.offset, low, rtol=1e-12)
    assert [a.size for a in descr.inputs[0].axes if a.type == "channel"] == [6]
    assert [a.size for a in descr.outputs[0].axes if a.type == "channel"] == [2]


def test_zoo_runtime_gives_the_student_output_with_context(context_model, context_package):
    model, _ = context_model
    test_input = read_npy(context_package, "test_input.npy")[0]
    assert test_input.shape == (6, 128 + 2 * 128, 128 + 2 * 128)
    assert_close(zoo_output(context_package, test_input, "torchscript"),
                 student_output(model, test_input, model.student.config.margin))
