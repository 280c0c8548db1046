"""OME-Zarr in and out: axes, physical scale, chunks and a pyramid; the CLI on a LocalCluster."""

from __future__ import annotations

import numpy as np
import pytest

from napari_tbsn import Denoiser
from napari_tbsn.cli import main
from napari_tbsn.image_io import open_output, read_image

from .conftest import noisy_image

zarr = pytest.importorskip("zarr")
ome_zarr = pytest.importorskip("ome_zarr")

SHAPE, CHUNKS, SCALE = (4, 64, 96), (2, 64, 48), [2.0, 0.25, 0.25]


def write_input(path, stack: np.ndarray) -> None:
    from ome_zarr.writer import write_image

    group = zarr.open_group(str(path), mode="w")
    write_image(stack, group, scale_factors=[], axes=["z", "y", "x"], scale=dict(zip("zyx", SCALE)),
                axes_units=dict.fromkeys("zyx", "micrometer"), storage_options={"chunks": CHUNKS})


@pytest.fixture(scope="module")
def ome_input(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ome")
    _, stack = noisy_image(SHAPE, seed=11)
    stack += np.random.default_rng(12).normal(0, 1, SHAPE).astype(np.float32)
    write_input(folder / "in.ome.zarr", stack)
    model = folder / "model.safetensors"
    Denoiser(preset="tiny", device="cpu", pd=1, context=1).fit(stack, "ZYX", iterations=2).save(model)
    return folder / "in.ome.zarr", model, stack


def test_level_zero_is_read_with_its_axes_scale_and_chunks(ome_input):
    path, _, stack = ome_input
    image = read_image(path)
    assert (image.format, image.axes, tuple(image.data.chunks)) == ("ome-zarr", "ZYX", CHUNKS)
    assert image.metadata["ome"]["scale"] == SCALE
    assert image.metadata["ome"]["axes"][0]["unit"] == "micrometer"
    np.testing.assert_array_equal(image.data[:], stack)


def test_predict_writes_an_ome_zarr_like_its_input_with_a_pyramid(ome_input, tmp_path):
    path, model, stack = ome_input
    target = tmp_path / "out.ome.zarr"
    assert main(["predict", str(path), "--model", str(model), "-o", str(target), "--pyramid", "2", "--quiet"]) == 0
    result = read_image(target)
    assert (result.axes, tuple(result.data.chunks), result.metadata["ome"]["scale"]) == ("ZYX", CHUNKS, SCALE)
    assert result.metadata["ome"]["axes"][1]["unit"] == "micrometer"
    np.testing.assert_allclose(result.data[:], Denoiser.load(model, device="cpu").predict(stack, "ZYX"), atol=1e-5)
    multiscales = zarr.open_group(str(target), mode="r").attrs["ome"]["multiscales"][0]
    assert [d["path"] for d in multiscales["datasets"]] == ["0", "1", "2"]
    assert multiscales["datasets"][2]["coordinateTransformations"][0]["scale"] == [2.0, 1.0, 1.0]
    level1 = zarr.open_array(str(target), path="1", mode="r")
    assert level1.shape == (4, 32, 48)
    np.testing.assert_allclose(level1[1, 3, 5], result.data[1, 6:8, 10:12].mean(), rtol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["out.ome.zarr"]  # no partial store left beside it


def test_cli_on_a_local_cluster_of_two_workers(ome_input, tmp_path):
    pytest.importorskip("distributed")
    path, model, stack = ome_input
    target = tmp_path / "out.ome.zarr"
    assert main(["predict", str(path), "--model", str(model), "-o", str(target), "--workers", "2",
                 "--tile-size", "64", "--quiet"]) == 0
    expected = Denoiser.load(model, device="cpu").predict(stack, "ZYX", tile_size=64)
    result = read_image(target)
    assert result.axes == "ZYX" and result.metadata["ome"]["scale"] == SCALE
    np.testing.assert_allclose(result.data[:], expected, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["out.ome.zarr"]
    assert not any(p.name.startswith(".tbsn") for p in target.iterdir())


def test_a_resumable_output_keeps_its_partial_store_and_reopens_it(tmp_path):
    target = tmp_path / "out.zarr"
    with pytest.raises(KeyboardInterrupt), open_output(target, (3, 8, 8), "ZYX", resumable=True) as out:
        out[0] = 7.0
        raise KeyboardInterrupt
    assert not target.exists()
    with open_output(target, (3, 8, 8), "ZYX", resumable=True) as out:
        assert np.all(out[0] == 7.0)  # what the first run finished is still there
        out[1:] = 1.0
    assert np.all(zarr.open_array(str(target), mode="r")[0] == 7.0)
    assert [p.name for p in tmp_path.iterdir()] == ["out.zarr"]


def test_cluster_prediction_refuses_inputs_workers_cannot_open(ome_input, tmp_path, capsys):
    _, model, stack = ome_input
    import tifffile

    tifffile.imwrite(tmp_path / "in.tif", stack)
    code = main(["predict", str(tmp_path / "in.tif"), "--model", str(model), "-o", str(tmp_path / "o.zarr"),
                 "--workers", "2", "--axes", "ZYX"])
    assert code != 0
    assert "read .zarr or .ome.zarr inputs" in capsys.readouterr().err


def test_denoise_fits_here_and_predicts_on_the_cluster(ome_input, tmp_path, monkeypatch):
    pytest.importorskip("distributed")
    from napari_tbsn import cli

    path, _, stack = ome_input
    called = []
    real = cli._predict_on_cluster
    monkeypatch.setattr(cli, "_predict_on_cluster", lambda *args: called.append(1) or real(*args))
    target, model = tmp_path / "out.ome.zarr", tmp_path / "fitted.safetensors"
    assert main(["denoise", str(path), "-o", str(target), "--workers", "1", "--tile-size", "64", "--preset", "tiny",
                 "--iterations", "1", "--student", "off", "--save-model", str(model), "--quiet"]) == 0
    assert called == [1]
    expected = Denoiser.load(model, device="cpu").predict(stack, "ZYX", tile_size=64)
    np.testing.assert_allclose(read_image(target).data[:], expected, atol=1e-5)
