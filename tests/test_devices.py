"""Device logic that a GPU user meets, tested on the CPU with torch.device objects and stand-ins."""

from __future__ import annotations

import types

import pytest
import torch

from napari_tbsn.devices import out_of_memory_class
from napari_tbsn.network.layers import BiasFreeLayerNorm
from napari_tbsn.prediction import needs_move


@pytest.mark.parametrize("held, asked, current, move", [
    ("cuda:1", "cuda", 0, True),    # "cuda" is the current device, cuda:0: the inputs go there
    ("cuda:0", "cuda", 0, False),
    ("cuda:1", "cuda", 1, False),
    ("cuda:0", "cuda:1", 0, True),
    ("cuda:1", "cuda:1", 0, False),
    ("cpu", "cuda:0", 0, True),
    ("cuda:0", "cpu", 0, True),
    ("cpu", "cpu", 0, False),
])
def test_a_network_moves_to_the_gpu_its_inputs_go_to(monkeypatch, held, asked, current, move):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    assert needs_move(torch.device(held), torch.device(asked)) is move


def test_the_out_of_memory_error_exists_in_every_supported_torch():
    before_2_5 = types.SimpleNamespace(cuda=types.SimpleNamespace(OutOfMemoryError=MemoryError))
    assert out_of_memory_class(before_2_5) is MemoryError  # torch 2.4 has only torch.cuda's
    assert out_of_memory_class(torch) is getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def test_layer_norm_statistics_do_not_overflow_in_float16():
    norm = BiasFreeLayerNorm(8)
    activations = torch.linspace(-400, 400, 8 * 16).reshape(1, 8, 4, 4)  # squares far past float16's 65504
    half = norm(activations.half())
    assert torch.isfinite(half).all() and half.abs().max() > 1  # float16 statistics made it inf or 0
    torch.testing.assert_close(half.float(), norm(activations), atol=2e-3, rtol=2e-3)
    wide = norm(activations.double())
    assert wide.dtype == torch.float64  # float64 (the blindness tests) keeps its precision


@pytest.mark.parametrize("float16, overflowing, survives", [(True, 3, True), (True, 20, False), (False, 1, False)])
def test_float16_steps_the_loss_scaler_skips_do_not_end_the_fit(monkeypatch, float16, overflowing, survives):
    """Under float16 the GradScaler skips steps whose gradients overflowed; a few in a row are
    its normal work. Without it (float32, bfloat16) one non-finite loss ends the fit."""
    from napari_tbsn import Denoiser, training

    from .conftest import noisy_image

    if float16:
        monkeypatch.setattr(training, "autocast_dtype", lambda device: torch.float16)
    real_step, calls = training.Trainer._step, []

    def step(self, learning_rate):
        calls.append(1)
        loss = real_step(self, learning_rate)
        return float("inf") if len(calls) <= overflowing else loss

    monkeypatch.setattr(training.Trainer, "_step", step)
    denoiser = Denoiser(preset="tiny", device="cpu")
    if survives:
        denoiser.fit(noisy_image((64, 64))[1], "YX", iterations=overflowing + 3)
        assert denoiser.summary.iterations == overflowing + 3
    else:
        with pytest.raises(FloatingPointError, match="the training loss became inf"):
            denoiser.fit(noisy_image((64, 64))[1], "YX", iterations=overflowing + 3)


@pytest.mark.parametrize("unit, mixed_precision, expected", [
    (torch.bfloat16, True, torch.bfloat16),  # a CPU with AMX or AVX512-BF16, an Ampere GPU
    (torch.bfloat16, False, None),           # a model fitted in float32 predicts in float32
    (torch.float16, True, None),             # an older GPU: float16 without a loss scale could overflow
    (None, True, None),                      # no fast reduced precision
])
def test_prediction_precision_follows_the_device_and_the_model(monkeypatch, fitted_tiny, unit, mixed_precision, expected):
    import dataclasses

    from napari_tbsn import prediction

    monkeypatch.setattr(prediction, "autocast_dtype", lambda device: unit)
    model = fitted_tiny.model
    model = dataclasses.replace(model, fit_config=dataclasses.replace(model.fit_config, mixed_precision=mixed_precision))
    assert prediction.prediction_autocast(model, torch.device("cpu")) == expected


def test_bfloat16_prediction_runs_in_bfloat16_and_stays_close_to_float32(monkeypatch, fitted_tiny):
    import numpy as np

    from napari_tbsn import prediction

    from .conftest import noisy_image

    _, noisy = noisy_image((96, 128), seed=5)
    results = {}
    for unit in (None, torch.bfloat16):
        monkeypatch.setattr(prediction, "autocast_dtype", lambda device, unit=unit: unit)
        results[unit] = fitted_tiny.predict(noisy, "YX")
    difference = np.abs(results[torch.bfloat16] - results[None])
    span = float(np.ptp(results[None]))
    assert difference.max() > 1e-4 * span  # the prediction did run in bfloat16
    assert difference.max() < 2e-2 * span  # and bf16 rounding is all that changed
