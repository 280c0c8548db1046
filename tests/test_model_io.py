import json
import os

import numpy as np
import pytest
import torch

from napari_tbsn import Denoiser
from napari_tbsn.model_io import ModelFileError

from .conftest import noisy_image


def test_save_and_load_round_trip(fitted_tiny, tmp_path, device):
    path = fitted_tiny.save(tmp_path / "model.safetensors")
    loaded = Denoiser.load(path, device=device)
    _, noisy = noisy_image((64, 64), seed=9)
    np.testing.assert_array_equal(loaded.predict(noisy, "YX"), fitted_tiny.predict(noisy, "YX"))
    assert loaded.normalizer == fitted_tiny.normalizer and loaded.axes == "YX"
    assert loaded.summary.iterations == fitted_tiny.summary.iterations
    assert not list(tmp_path.glob("*.partial"))


def test_model_file_is_safetensors_with_a_json_header(fitted_tiny, tmp_path):
    from safetensors import safe_open

    path = fitted_tiny.save(tmp_path / "model.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["napari_tbsn"])
    assert header["network"]["dim"] == 8 and header["preset"] == "tiny"
    assert "normalization" in header and "package_version" in header


def test_fine_tuning_continues_from_loaded_weights(fitted_tiny, tmp_path, device):
    loaded = Denoiser.load(fitted_tiny.save(tmp_path / "m.safetensors"), device=device)
    before = {k: v.clone() for k, v in loaded.network.state_dict().items()}
    _, other = noisy_image((96, 96), seed=11)
    loaded.fit(other, "YX", iterations=2)
    after = loaded.network.state_dict()
    # Close to the loaded weights (two small steps), not a fresh random network. The output
    # conv is left out: its prior-variance rows are re-fitted to the new data by design.
    drift = max(float((after[k] - before[k]).abs().max()) for k in before if not k.startswith("output_conv"))
    assert 0 < drift < 0.05


@pytest.mark.parametrize("content", [b"", b"not a model at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}"])
def test_corrupt_files_get_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelFileError):
        Denoiser.load(path)


def test_truncated_and_foreign_files_are_rejected(fitted_tiny, tmp_path):
    from safetensors.torch import save_file

    path = fitted_tiny.save(tmp_path / "model.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="corrupt|truncated|readable"):
        Denoiser.load(tmp_path / "cut.safetensors")
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ModelFileError, match="not a napari-tbsn model"):
        Denoiser.load(tmp_path / "foreign.safetensors")
    with pytest.raises(ModelFileError, match="no model file"):
        Denoiser.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_models_follow_the_umask_like_other_outputs(fitted_tiny, tmp_path, umask, expected):
    previous = os.umask(umask)
    try:
        path = fitted_tiny.save(tmp_path / "m.safetensors")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == expected
