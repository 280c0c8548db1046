"""Fits that stop where more time would not help: the data's pass limit, and the message when
the validation loss stops improving."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from napari_tbsn import Denoiser
from napari_tbsn.config import FIT_PRESETS, FitConfig, TrainingSummary
from napari_tbsn.training import PLATEAU_ITERATIONS, FitProgress, pass_horizon, plateau_since

from .conftest import noisy_image


def test_a_small_image_ends_its_schedule_at_its_pass_limit_with_time_left():
    _, noisy = noisy_image((128, 128))
    config = dataclasses.replace(FIT_PRESETS["tiny"], max_passes=8.0)
    # Crops cover every pixel (the held-out pixels only leave the loss): 16384 pixels, 4 crops of
    # 64x64 per iteration.
    assert pass_horizon(128 * 128, config, 64) == 8
    denoiser = Denoiser(preset="tiny", device="cpu", fit_config=config).fit(noisy, "YX", time_budget=600)
    summary = denoiser.summary
    assert summary.iterations == 8 == summary.pass_limit and summary.seconds < 600
    assert summary.best_iteration == 8  # the schedule completed there: validated at its end
    assert "more time would fit the noise" in summary.describe()
    shorter = Denoiser(preset="tiny", device="cpu", fit_config=config).fit(noisy, "YX", iterations=3).summary
    assert shorter.iterations == 3 and "more time" not in shorter.describe()


def test_no_pass_limit_when_turned_off():
    assert pass_horizon(10**6, dataclasses.replace(FitConfig(), max_passes=0), 64) is None


def test_validation_that_stopped_improving_is_said():
    assert plateau_since(100, 100 + PLATEAU_ITERATIONS) == 100
    assert plateau_since(100, 99 + PLATEAU_ITERATIONS) is None
    assert plateau_since(1000, 1300) is None  # 300 iterations, but under a quarter of the fit
    assert plateau_since(1000, 1400) == 1000
    assert plateau_since(0, 5000) is None  # no validation yet
    progress = FitProgress(400, None, 0.1, None, 0.05, 10.0, 5.0, 0.5, plateau=150)
    assert progress.describe_plateau() == "validation stopped improving at iteration 150"
    summary = TrainingSummary(iterations=1600, seconds=60, best_iteration=900, best_validation_loss=0.01,
                              plateau_iteration=900)
    assert "validation stopped improving at iteration 900: more fitting time would not help" in summary.describe()
    assert np.isfinite(summary.best_validation_loss)


@pytest.mark.parametrize("plateau, limit, stopped, said", [
    (None, None, False, "best at iteration 80 of 100; still improving at the end: more time would likely help"),
    (40, None, False, "best at iteration 80 of 100: more time would not help"),
    (None, 100, False, "best at iteration 80 of 100; it covered the image many times over"),
    (None, None, True, "best at iteration 80 of 100; stopped early: more time may still help"),
])
def test_the_summary_says_where_the_fit_found_its_best_point(plateau, limit, stopped, said):
    summary = TrainingSummary(iterations=100, seconds=10, best_iteration=80, best_validation_loss=0.1,
                              plateau_iteration=plateau, pass_limit=limit, stopped_early=stopped)
    assert said in summary.headline()
    assert "best validation loss 0.1 at iteration 80 of 100" in summary.describe()
