"""Channels fitted jointly or independently (the channels as samples of one single-channel
network), the automatic choice between them, and the blind spot through the whole predict path."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from napari_tbsn import Denoiser, PredictOptions
from napari_tbsn.axes import PlaneLayout
from napari_tbsn.channels import choose_channels, structure_correlation
from napari_tbsn.cli import main
from napari_tbsn.config import network_preset
from napari_tbsn.network import TBSN
from napari_tbsn.normalization import Normalizer

from .conftest import noisy_image


def _unrelated(shape=(96, 128)) -> np.ndarray:
    """Three channels of different structures, brightness and noise."""
    channels = [noisy_image(shape, seed=seed, peak=peak)[1] for seed, peak in ((1, 30.0), (2, 10.0), (3, 20.0))]
    return np.stack(channels)


def _shared(shape=(96, 128)) -> np.ndarray:
    """Three channels of one structure at three brightnesses (a fluorophore in three bands)."""
    clean, _ = noisy_image(shape, seed=4, peak=30.0)
    rng = np.random.default_rng(5)
    return np.stack([rng.poisson(clean * gain) + rng.normal(0, 1, clean.shape) for gain in (1.0, 0.5, 0.3)]
                    ).astype(np.float32)


def test_channels_as_samples_run_every_channel_through_one_single_channel_network():
    torch.manual_seed(0)
    config = network_preset("tiny", 3, variance_head=True, context_channels=6, channels_as_samples=True)
    network = TBSN(config).eval()
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    single = TBSN(dataclasses.replace(config, in_channels=1, out_channels=1, context_channels=2,
                                      channels_as_samples=False)).eval()
    single.load_state_dict(network.state_dict())  # the same weights: nothing per channel
    x = torch.randn(2, 9, 64, 64)  # the plane's 3 channels, then 2 context planes of 3 channels
    with torch.no_grad():
        out = network(x)
        assert out.shape == (2, 6, 64, 64)  # 3 means, then 3 log prior variances
        for channel in range(3):
            alone = single(x[:, channel::3])
            torch.testing.assert_close(out[:, [channel, 3 + channel]], alone, rtol=0, atol=0)


def test_channels_as_samples_need_outputs_for_every_channel():
    with pytest.raises(ValueError, match="as many outputs as inputs"):
        dataclasses.replace(network_preset("tiny", 3, channels_as_samples=True), out_channels=1)


@pytest.fixture(scope="module")
def independent_model(device):
    stack = np.stack([_unrelated((64, 64)) for _ in range(4)])  # ZCYX
    return Denoiser(preset="tiny", device=device, channels="independent", context=1).fit(stack, "ZCYX", iterations=2)


def test_independent_channels_are_blind_and_apart_through_the_predict_path(independent_model):
    """Through padding, several tiles, the x8 ensemble, the stack context and the lattice filter:
    a channel's pixels on one parity lattice change no output at them, in any channel, and
    change nothing at all in the other channels."""
    denoiser = independent_model
    assert denoiser.network_config.channels_as_samples and denoiser.lattice_filter is not None
    options = PredictOptions(estimator="blind_spot", ensemble=8, tile_size=64, tile_overlap=16)
    stack = np.stack([_unrelated((64, 96)) for _ in range(4)])
    before = denoiser.predict(stack, "ZCYX", options=options)
    lattice = ([0, 30, 62], [0, 40, 94])
    for plane in (0, 2):
        changed = stack.copy()
        changed[plane, 1][lattice] += 500.0
        after = denoiser.predict(changed, "ZCYX", options=options)
        for channel in range(3):
            np.testing.assert_array_equal(after[plane, channel][lattice], before[plane, channel][lattice])
        np.testing.assert_array_equal(after[:, [0, 2]], before[:, [0, 2]])  # the other channels never see it
        assert np.abs(after[:, 1] - before[:, 1]).max() > 1e-3  # the change is seen in its own channel


def test_auto_fits_unrelated_stains_independently_and_shared_structures_jointly():
    for data, wanted in ((_unrelated(), "independent"), (_shared(), "joint")):
        layout = PlaneLayout.of(data.shape, "CYX")
        choice = choose_channels("auto", data, layout, Normalizer.from_data(data, layout))
        assert choice.mode == wanted, (choice, structure_correlation(data, layout, Normalizer.from_data(data, layout)))
        assert f"{choice.correlation:.2f}" in choice.reason
    one = _unrelated()[:1]
    assert choose_channels("auto", one, PlaneLayout.of(one.shape, "CYX"), Normalizer.from_data(
        one, PlaneLayout.of(one.shape, "CYX"))).mode == "single"


def test_the_choice_is_reported_saved_and_kept_by_a_fine_tune(tmp_path, device):
    data = _unrelated()
    denoiser = Denoiser(preset="tiny", device=device).fit(data, "CYX", iterations=2)
    assert denoiser.network_config.channels_as_samples
    assert "channels fitted independent: their structures hardly correlate" in denoiser.summary.describe()
    path = denoiser.save(tmp_path / "model.safetensors")
    loaded = Denoiser.load(path, device=device)
    assert loaded.network_config.channels_as_samples and loaded.channels == "independent"
    np.testing.assert_array_equal(loaded.predict(data, "CYX", ensemble=1), denoiser.predict(data, "CYX", ensemble=1))
    loaded.fit(_shared(), "CYX", iterations=1)  # a fine-tune keeps the network it fine-tunes
    assert loaded.network_config.channels_as_samples
    joint = Denoiser(preset="tiny", device=device, channels="joint").fit(data, "CYX", iterations=1)
    assert not joint.network_config.channels_as_samples and "channels fitted joint: as asked" in joint.summary.describe()


def test_a_single_channel_says_nothing_of_channels():
    _, noisy = noisy_image((64, 64))
    denoiser = Denoiser(preset="tiny", device="cpu", channels="independent").fit(noisy, "YX", iterations=1)
    assert not denoiser.network_config.channels_as_samples and "channels" not in denoiser.summary.describe()


def test_an_unknown_channel_mode_is_refused():
    with pytest.raises(ValueError, match="channels must be one of auto, joint, independent, got 'separate'"):
        Denoiser(channels="separate")


def test_command_line_channels_and_report(tmp_path):
    import tifffile

    source = tmp_path / "stains.tif"
    tifffile.imwrite(source, _unrelated(), metadata={"axes": "CYX"})
    report = tmp_path / "report.json"
    code = main(["denoise", str(source), "-o", str(tmp_path / "out.tif"), "--preset", "tiny", "--iterations", "2",
                 "--channels", "joint", "--student", "off", "--quiet", "--report", str(report)])
    assert code == 0
    assert json.loads(report.read_text())["channels"] == "joint"


def test_training_planes_fold_each_channel_with_its_own_context_planes():
    from napari_tbsn.patches import channels_as_samples

    # 2 planes; each holds 3 channels, then 2 context planes of 3 channels: value = 100 plane + 10 slot + channel.
    planes = np.array([[[[100 * n + 10 * slot + c]] for slot in range(3) for c in range(3)] for n in range(2)],
                      dtype=np.float32)
    folded = channels_as_samples(planes, 3)
    assert folded.shape == (6, 3, 1, 1)
    for n in range(2):
        for c in range(3):
            assert folded[3 * n + c, :, 0, 0].tolist() == [100 * n + c, 100 * n + 10 + c, 100 * n + 20 + c]
