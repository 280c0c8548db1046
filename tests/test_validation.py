"""Validation on held-out pixels: they never reach the training loss, validation scores exactly
them, and what the fit does with the scores (the keep rule, the plateau's cooldown, runaway steps,
gradient clipping)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_tbsn import Denoiser
from napari_tbsn.config import FIT_PRESETS, network_preset
from napari_tbsn.network import TBSN
from napari_tbsn.patches import PatchSampler
from napari_tbsn.training import (
    CLIP_FACTOR, CLIP_WINDOW, COOLDOWN_MIN, PLATEAU_ITERATIONS, RUNAWAY, Trainer, _Best, _Cooldown,
)
from napari_tbsn.config import TrainingSummary

from .conftest import noisy_image


def _coordinates(count: int = 2, height: int = 96, width: int = 80) -> np.ndarray:
    """(N, 2, H, W) planes whose two channels hold each pixel's flat index and its plane."""
    index = np.arange(count * height * width, dtype=np.float32).reshape(count, 1, height, width)
    plane = np.broadcast_to(np.arange(count, dtype=np.float32)[:, None, None, None], index.shape)
    return np.concatenate([index, plane], axis=1)


def test_the_training_mask_follows_each_crop_through_its_flips_and_turns():
    planes = _coordinates()
    sampler = PatchSampler(planes, 32, 0.1, 16, np.random.default_rng(0), held_out_pixels=0.05)
    held = np.concatenate([mask.reshape(-1) for mask in sampler.pixel_masks])
    assert 0.03 < held.mean() < 0.07
    batch, weights = sampler.sample_with_mask(np.random.default_rng(1), 64)
    source = batch[:, 0].astype(int)  # the flat index each crop pixel came from
    assert weights.shape == (64, 1, 32, 32)
    np.testing.assert_array_equal(weights[:, 0] == 0, held[source])
    assert (weights == 0).any() and (weights == 1).any()


def test_validation_crops_cover_every_plane_and_carry_their_pixels_masks():
    planes = _coordinates(count=1, height=100, width=70)
    sampler = PatchSampler(planes, 32, 0.1, 100, np.random.default_rng(0), held_out_pixels=0.05)
    covered = np.zeros(100 * 70, dtype=bool)
    covered[sampler.validation[:, 0].astype(int).reshape(-1)] = True
    assert covered.all()  # a grid of crops over the whole plane (overlapping where 32 does not divide)
    held = sampler.pixel_masks[0].reshape(-1)
    scored = sampler.validation[:, 0][sampler.validation_masks].astype(int)
    np.testing.assert_array_equal(np.sort(scored), np.flatnonzero(held))  # every held-out pixel, once
    assert sampler.training_pixels == 100 * 70  # crops come from anywhere


def _trainer(pd: int, held_out: float = 0.05, forward=None, **config) -> tuple[Trainer, PatchSampler]:
    _, noisy = noisy_image((96, 96))
    planes = (noisy / noisy.max())[None, None].astype(np.float32)
    sampler = PatchSampler(planes, 48, 0.1, 4, np.random.default_rng(0), held_out_pixels=held_out)
    network = TBSN(network_preset("tiny", 1))
    fit = dataclasses.replace(FIT_PRESETS["tiny"], mixed_precision=False, **config)
    return Trainer(network, sampler, fit, torch.device("cpu"), pd=pd, forward=forward), sampler


@pytest.mark.parametrize("pd", [1, 2])
def test_held_out_pixels_are_never_a_training_target(pd):
    """The training loss does not change whatever the noisy values at the held-out pixels are
    (with the network's output fixed: they reach the loss only as targets), and does at others."""
    output = torch.rand(4 * pd * pd, 1, 48 // pd, 48 // pd)
    trainer, sampler = _trainer(pd, forward=lambda inputs: output)
    batch, weights = sampler.sample_with_mask(np.random.default_rng(3), 4)
    batch, weights = torch.from_numpy(batch), torch.from_numpy(weights)
    loss = float(trainer._run(batch, weights=weights))
    changed = batch.clone()
    changed[weights.expand_as(batch) == 0] += 100.0
    assert float(trainer._run(changed, weights=weights)) == pytest.approx(loss, rel=1e-6)
    changed = batch.clone()
    changed[weights.expand_as(batch) == 1] += 1.0
    assert float(trainer._run(changed, weights=weights)) != pytest.approx(loss, rel=1e-3)


@pytest.mark.parametrize("pd", [1, 2])
def test_validation_scores_the_held_out_pixels_and_nothing_else(pd):
    trainer, sampler = _trainer(pd, forward=None)
    trainer.network = trainer.forward = _Zeros()  # predicts 0: the errors are the noisy values squared
    errors = trainer.validation_errors().numpy()
    values = sampler.validation[:, 0][sampler.validation_masks]
    np.testing.assert_allclose(np.sort(errors), np.sort(values.astype(np.float64) ** 2), rtol=1e-6)


class _Zeros(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x[:, :1])

    def blind_inputs(self, x):
        return 1


def _checkpoints(errors: list[np.ndarray]) -> tuple[Trainer, _Best, TrainingSummary]:
    trainer, _ = _trainer(1)
    vectors = iter(torch.from_numpy(e) for e in errors)
    trainer.validation_errors = lambda: next(vectors)
    best, summary = _Best(trainer.network.state_dict()), TrainingSummary()
    for iteration in range(1, len(errors) + 1):
        trainer._checkpoint(best, summary, iteration * 25, 0.0)
    return trainer, best, summary


def test_a_later_checkpoint_as_good_as_the_lowest_is_kept_and_a_clearly_worse_one_is_not():
    rng = np.random.default_rng(0)
    base = rng.exponential(1.0, 5000)
    noise = rng.normal(0, 0.01, 5000)
    _, best, summary = _checkpoints([base, base + noise + 0.0001])  # within two standard errors
    assert summary.best_iteration == 50 and best.improved == 25
    _, best, summary = _checkpoints([base, base + noise + 0.01])  # clearly worse (1%)
    assert summary.best_iteration == 25 and best.lowest == pytest.approx(base.mean())
    other = rng.normal(0, 0.01, 5000)
    _, best, summary = _checkpoints([base, base + noise - 0.01, base + other - 0.0101])
    assert best.improved == 50 and summary.best_iteration == 75  # a clear gain, then a tie


def test_a_slow_steady_gain_counts_as_improvement_though_no_single_step_is_clear():
    """Each checkpoint beats the one before by one standard error (never clear on its own), so a
    plateau measured from the lowest so far would fire in the middle of a steady gain; measured
    from the last clear improvement, the gain shows every few checkpoints."""
    rng = np.random.default_rng(0)
    base, count, spread = rng.exponential(1.0, 5000), 5000, 0.01
    step = spread * np.sqrt(2 / count)  # one standard error of the paired difference

    def centred():
        wobble = rng.normal(0, spread, count)
        return wobble - wobble.mean()

    _, best, summary = _checkpoints([base - k * step + centred() for k in range(12)])
    assert best.improved >= 25 * 10 and summary.best_iteration == 25 * 12


def test_a_runaway_goes_back_to_the_kept_weights_with_half_the_rate():
    base = np.random.default_rng(0).exponential(1.0, 5000)
    trainer, best, summary = _checkpoints([base])
    kept = {name: value.clone() for name, value in best.state.items()}
    with torch.no_grad():
        for parameter in trainer.network.parameters():
            parameter.add_(1.0)
        for average in trainer.average:
            average.sub_(1.0)
    trainer.optimizer.state[trainer.parameters[0]] = {"step": torch.tensor(5.0)}
    trainer.validation_errors = lambda: torch.from_numpy(base * (RUNAWAY + 0.05))
    trainer._checkpoint(best, summary, 50, 0.0)
    assert summary.runaways == 1 and trainer.learning_rate_scale == 0.5 and not trainer.optimizer.state
    assert summary.best_iteration == 25
    assert trainer.rewarm_from == 50 and best.restarted == 50  # warmed up again; the plateau's clock restarts
    assert best.improved == 25 and best.plateau(50 + PLATEAU_ITERATIONS - 1) is None
    assert best.plateau(50 + PLATEAU_ITERATIONS) == 25  # said from the last improvement
    for name, value in trainer.network.state_dict().items():
        torch.testing.assert_close(value, kept[name])
    for average, parameter in zip(trainer.average, trainer.parameters):
        torch.testing.assert_close(average, parameter.detach())
    assert "1 unstable step(s) undone" in summary.describe()


def test_gradients_are_clipped_to_a_multiple_of_their_recent_median():
    trainer, _ = _trainer(1)
    for parameter in trainer.parameters:
        parameter.grad = torch.full_like(parameter, 10.0)
    trainer.gradient_norms = [1.0] * CLIP_WINDOW
    trainer._clip_gradients()
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in trainer.parameters]))
    assert float(norm) == pytest.approx(CLIP_FACTOR, rel=1e-4)
    assert trainer.gradient_norms[-1] > 100  # the norm before clipping is what the median sees
    trainer.gradient_norms = [1.0] * (CLIP_WINDOW - 1)  # too few steps yet: no clipping
    for parameter in trainer.parameters:
        parameter.grad = torch.full_like(parameter, 10.0)
    trainer._clip_gradients()
    assert float(torch.linalg.vector_norm(trainer.parameters[0].grad)) > CLIP_FACTOR


def test_the_cooldown_anneals_to_the_floor_and_is_skipped_near_the_end():
    cooldown = _Cooldown.after(1000, 0.6, 0.02, 6400)
    assert cooldown.length == 100 and cooldown.end == 1100
    assert cooldown.factor(1000) == pytest.approx(0.6) and cooldown.factor(1100) == pytest.approx(0.02)
    assert 0.02 < cooldown.factor(1050) < 0.6
    assert _Cooldown.after(100, 0.6, 0.02, None).length == COOLDOWN_MIN
    assert _Cooldown.after(6380, 0.1, 0.02, 6400) is None


def test_a_fit_whose_validation_stalls_cools_down_and_ends_saying_so(device, monkeypatch):
    """Validation that never improves after its first checkpoint: the fit ends at the plateau plus
    its cooldown, far short of the iterations asked for, and says more time would not help."""
    flat = torch.from_numpy(np.random.default_rng(0).exponential(1.0, 2000))
    monkeypatch.setattr(Trainer, "validation_errors", lambda self: flat)
    _, noisy = noisy_image((64, 64))
    config = dataclasses.replace(FIT_PRESETS["tiny"], batch_size=1, validation_every=25, max_passes=0)
    summary = Denoiser(preset="tiny", device=device, fit_config=config, estimator="blind_spot",
                       lattice=False).fit(noisy, "YX", iterations=2000).summary
    stalled = 25 + PLATEAU_ITERATIONS
    assert summary.plateau_iteration == 25
    assert summary.iterations == stalled + COOLDOWN_MIN
    assert summary.best_iteration == summary.iterations  # every tie kept: the latest
    assert "more time would not help" in summary.headline()


def test_without_held_out_pixels_the_lowest_loss_is_kept_and_nothing_is_undone():
    """Distillation validates on blocks: its trainer keeps the strict lowest, clips nothing, and
    neither cools down nor rolls back."""
    _, noisy = noisy_image((96, 96))
    sampler = PatchSampler((noisy / noisy.max())[None, None].astype(np.float32), 48, 0.5, 4,
                           np.random.default_rng(0))
    trainer = Trainer(TBSN(network_preset("tiny", 1)), sampler, FIT_PRESETS["tiny"], torch.device("cpu"))
    assert not trainer.guarded and trainer.validation_masks is None
    losses = iter([1.0, 1.0 + 1e-9, 0.9, 2.0])
    trainer.validation_errors = lambda: torch.full((len(sampler.validation),), next(losses), dtype=torch.float64)
    best, summary = _Best(trainer.network.state_dict()), TrainingSummary()
    for iteration in (25, 50, 75, 100):
        trainer._checkpoint(best, summary, iteration, 0.0)
    assert summary.best_iteration == 75 and best.improved == 75 and summary.runaways == 0
    assert trainer.learning_rate_scale == 1.0


@pytest.mark.parametrize("value", [-0.01, 0.6, float("nan"), True, "3%"])
def test_a_held_out_share_out_of_range_is_refused_in_one_line(value):
    with pytest.raises(ValueError, match="validation_pixels must be a finite number from 0 to 0.5") as refused:
        dataclasses.replace(FIT_PRESETS["small"], validation_pixels=value)
    assert "\n" not in str(refused.value)
