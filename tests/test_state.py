"""One fitted model, per-call options, one cancel token per job: the blind spot holds with
stack context at every plane, a stop works in every phase, and nothing a fit does to a copy
can damage the model the user already has."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from napari_tbsn import Denoiser, FitCancelled, PredictionCancelled, PredictOptions
from napari_tbsn.axes import PlaneLayout

from .conftest import agreement, noisy_image

STOP_WITHIN_S = 1.0


def _stack(planes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    clean, _ = noisy_image((64, 64), seed=seed)
    return np.stack([rng.poisson(clean) + rng.normal(0, 1, clean.shape) for _ in range(planes)]).astype(np.float32)


@pytest.fixture(scope="module")
def context_models(device):
    """A tiny model per stack context 1-3, fitted briefly (its weights need not be good)."""
    return {k: Denoiser(preset="tiny", device=device, context=k).fit(_stack(8), "ZYX", iterations=2) for k in (1, 2, 3)}


# Pixels on one parity lattice, further apart than the lattice filter's reach: the output at
# each is blind to all of them (the network to its whole lattice, the filter to its own pixel).
CHANGED = ([0, 30, 62], [0, 40, 62])


@pytest.mark.parametrize("context", [1, 2, 3])
def test_no_plane_sees_its_own_noisy_pixels_through_the_stack_context(context_models, context):
    """Through padding, several tiles, the x8 ensemble and the lattice filter, at every plane
    of stacks of 2 to 8 planes, the output at a pixel never moves when that pixel alone does."""
    denoiser = context_models[context]
    assert denoiser.context_planes == context and denoiser.lattice_filter is not None
    for planes in range(2, 9):
        # The x8 ensemble (8x the time) on the shortest stack the context allows, where the
        # ends mirrored; the ensemble's own blindness is tested in test_tiling.
        options = PredictOptions(estimator="blind_spot", ensemble=8 if planes == 2 * context else 1, tile_size=64,
                                 tile_overlap=16)
        stack = _stack(planes, seed=planes)
        if planes < 2 * context:
            with pytest.raises(ValueError, match=f"at least {2 * context} planes"):
                denoiser.predict(stack, "ZYX", options=options)
            continue
        before = denoiser.predict(stack, "ZYX", options=options)
        for plane in range(planes):
            changed = stack.copy()
            changed[plane][CHANGED] += 500.0
            after = denoiser.predict(changed, "ZYX", options=options)
            np.testing.assert_array_equal(after[plane][CHANGED], before[plane][CHANGED],
                                          err_msg=f"context {context}, {planes} planes, plane {plane}")
            assert np.abs(after - before).max() > 1e-3  # the change is seen elsewhere


def test_a_context_the_stack_is_too_short_for_is_refused_before_fitting():
    with pytest.raises(ValueError, match="at least 4 planes along Z, but this stack has 3"):
        Denoiser(preset="tiny", device="cpu", context=2).fit(_stack(3), "ZYX", iterations=1)


def test_the_context_window_gives_a_plane_the_same_prediction_as_the_whole_stack(context_models):
    denoiser = context_models[2]
    stack = _stack(7, seed=3)
    whole = denoiser.predict(stack, "ZYX", ensemble=1)
    layout = PlaneLayout.of(stack.shape, "ZYX")
    for plane in range(7):
        selection, keep = layout.context_window((plane,), 2)
        window = denoiser.predict(stack[selection], "ZYX", ensemble=1)
        np.testing.assert_allclose(window[keep][0], whole[plane], atol=agreement(denoiser.device, whole, 1e-5))


# -- a stop in every phase -------------------------------------------------------------------
def _weights(denoiser: Denoiser) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in denoiser.network.state_dict().items()}


@pytest.fixture(scope="module")
def fitted(device):
    _, noisy = noisy_image((128, 128), seed=11)
    return Denoiser(preset="tiny", device=device).fit(noisy, "YX", iterations=3), noisy


class _StopAfterReads:
    """An array that sets a cancel token at its n-th plane read: a stop while the data load."""

    def __init__(self, data, cancel: threading.Event, reads: int) -> None:
        self.data, self.cancel, self.reads = data, cancel, reads
        self.shape, self.dtype = data.shape, data.dtype
        self.set_at: float | None = None

    def __getitem__(self, key):
        self.reads -= 1
        if self.reads == 0:
            self.cancel.set()
            self.set_at = time.perf_counter()
        return self.data[key]


def _stop_while_in(monkeypatch, module_name: str, cancel: threading.Event, checks: int) -> dict:
    """Set the token at the `checks`-th cancel check inside `module` (napari_tbsn.posterior: the
    variance-head loop; napari_tbsn.lattice: the lattice fit's loop), so the stop arrives while
    the phase runs and only its own checks can see it in time."""
    import importlib

    module = importlib.import_module(module_name)
    real = module.raise_if_cancelled
    when: dict = {"calls": 0}

    def counting(token, error, what):
        when["calls"] += 1
        if when["calls"] == checks:
            when["set_at"] = time.perf_counter()
            cancel.set()
        return real(token, error, what)

    monkeypatch.setattr(module, "raise_if_cancelled", counting)
    return when


@pytest.mark.parametrize("phase", ["loading", "training", "variance head", "lattice"])
def test_a_stopped_fine_tune_stops_within_a_second_and_keeps_the_previous_model(fitted, phase, monkeypatch):
    previous, noisy = fitted
    denoiser = Denoiser.from_model(previous.model, device="cpu")
    weights, model = _weights(denoiser), denoiser.model
    cancel = threading.Event()
    data, when, callback = noisy, {}, None
    if phase == "loading":
        data = _StopAfterReads(noisy, cancel, reads=2)
    elif phase == "training":
        def callback(progress):
            if progress.iteration == 2:
                when["set_at"] = time.perf_counter()
                cancel.set()
    elif phase == "variance head":
        when = _stop_while_in(monkeypatch, "napari_tbsn.posterior", cancel, checks=50)
    else:
        when = _stop_while_in(monkeypatch, "napari_tbsn.lattice", cancel, checks=3)
    with pytest.raises(FitCancelled, match="previous model is unchanged|stopped"):
        denoiser.fit(data, "YX", iterations=1000 if phase == "training" else 3, callback=callback, cancel=cancel)
    stopped_at = time.perf_counter()
    set_at = data.set_at if phase == "loading" else when["set_at"]
    assert stopped_at - set_at < STOP_WITHIN_S, phase
    if phase in ("variance head", "lattice"):
        assert when["calls"] == (50 if phase == "variance head" else 3)  # stopped at the check after the stop
    assert denoiser.model is model
    for name, value in _weights(denoiser).items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)


def test_a_first_fit_stopped_while_loading_has_no_model_and_one_stopped_later_keeps_its_weights(monkeypatch):
    _, noisy = noisy_image((128, 128), seed=12)
    cancel = threading.Event()
    denoiser = Denoiser(preset="tiny", device="cpu")
    with pytest.raises(FitCancelled):
        denoiser.fit(_StopAfterReads(noisy, cancel, reads=1), "YX", iterations=5, cancel=cancel)
    assert not denoiser.is_fitted
    # Stopped in the variance-head fit: the best weights reached, but no posterior yet.
    cancel = threading.Event()
    _stop_while_in(monkeypatch, "napari_tbsn.posterior", cancel, checks=50)
    denoiser.fit(noisy, "YX", iterations=3, cancel=cancel)
    assert denoiser.is_fitted and not denoiser.predicts_posterior and not denoiser.uses_posterior
    assert "Fit again" in denoiser.describe_noise()
    assert denoiser.predict(noisy, "YX").shape == noisy.shape  # the plain blind-spot mean


def test_a_stop_during_prediction_ends_it_within_a_second(fitted):
    """Set from another thread while tiles run through the x8 ensemble: the token is checked
    before every network pass (each view, each R3 round), so a stop waits for one pass at most."""
    denoiser, _ = fitted
    _, large = noisy_image((384, 384), seed=15)
    cancel = threading.Event()
    when = {}

    def stop_soon():
        time.sleep(0.5)
        when["set_at"] = time.perf_counter()
        cancel.set()

    threading.Thread(target=stop_soon).start()
    with pytest.raises(PredictionCancelled):
        denoiser.predict(np.stack([large] * 8), "ZYX", ensemble=8, cancel=cancel)
    assert time.perf_counter() - when["set_at"] < STOP_WITHIN_S


def test_ending_the_training_early_still_completes_the_model(device):
    _, noisy = noisy_image((128, 128), seed=16)
    stop_training = threading.Event()
    denoiser = Denoiser(preset="tiny", device=device).fit(
        noisy, "YX", iterations=1000, stop_training=stop_training,
        callback=lambda progress: progress.iteration == 3 and stop_training.set())
    assert denoiser.summary.iterations == 3 and denoiser.summary.stopped_early
    assert denoiser.uses_posterior and denoiser.lattice_filter is not None  # the closing fits ran
    # A fine-tune keeps the pd its network was fitted at, whatever the new data measure.
    refit = Denoiser.from_model(denoiser.model, device=device).fit(noisy, "YX", iterations=2)
    assert refit.pd == denoiser.pd == 1 and refit.context_planes == 0


def test_cancel_from_another_thread_never_races_the_job(fitted):
    denoiser, noisy = fitted
    stop = threading.Event()
    errors: list[BaseException] = []

    def hammer():
        while not stop.is_set():
            try:
                denoiser.cancel()
            except BaseException as error:  # noqa: BLE001 - any error here is the bug
                errors.append(error)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        for _ in range(3):
            with pytest.raises(PredictionCancelled):
                denoiser.predict(noisy, "YX", ensemble=1)
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert denoiser.predict(noisy, "YX", ensemble=1).shape == noisy.shape  # a new job, a new token


# -- failures leave the model as it was ------------------------------------------------------
def test_a_fine_tune_that_fails_leaves_the_model_exactly_as_it_was(fitted, monkeypatch, device):
    from napari_tbsn.training import Trainer

    previous, noisy = fitted
    denoiser = Denoiser.from_model(previous.model, device=device)
    weights, model = _weights(denoiser), denoiser.model
    real_step = Trainer._step

    def diverging(self, learning_rate):
        real_step(self, learning_rate)  # the copy's weights do change...
        return float("nan")  # ...and then the loss blows up

    monkeypatch.setattr(Trainer, "_step", diverging)
    with pytest.raises(FloatingPointError, match="loss became nan"):
        denoiser.fit(noisy, "YX", iterations=10)
    assert denoiser.model is model
    for name, value in _weights(denoiser).items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)


def test_out_of_memory_halves_the_batch_then_the_patch_and_says_so(monkeypatch):
    from napari_tbsn.training import Trainer

    _, noisy = noisy_image((128, 128), seed=13)
    seen = []
    real_output = Trainer._output  # every network pass of the fit, training and validation

    def tight_memory(self, batch, forward=None):
        seen.append(tuple(batch.shape))
        if batch.shape[0] * batch.shape[-1] ** 2 > 64 * 64:  # only one 64x64 patch fits
            raise torch.OutOfMemoryError("simulated")
        return real_output(self, batch, forward)

    monkeypatch.setattr(Trainer, "_output", tight_memory)
    config = __import__("dataclasses").replace(Denoiser(preset="tiny").fit_config, patch_size=128, batch_size=2)
    with pytest.warns(UserWarning, match="ran out of memory while fitting; continuing with") as warned:
        Denoiser(preset="tiny", device="cpu", fit_config=config, lattice=False).fit(noisy, "YX", iterations=2)
    said = [str(w.message) for w in warned]
    assert any("batch size 1" in s for s in said) and any("64-pixel patches" in s for s in said)
    assert seen[0] == (2, 1, 128, 128) and seen[-1] == (1, 1, 64, 64)


def test_out_of_memory_in_prediction_halves_the_tile_and_gives_the_same_result(fitted, monkeypatch):
    from napari_tbsn.prediction import TileModel

    denoiser, _ = fitted
    _, noisy = noisy_image((200, 200), seed=14)
    expected = denoiser.predict(noisy, "YX", ensemble=1, tile_size=128)  # where the retries end
    real_call = TileModel.__call__

    def tight_memory(self, batch, inside=None):
        if batch.shape[-1] > 128:
            raise torch.OutOfMemoryError("simulated")
        return real_call(self, batch, inside)

    monkeypatch.setattr(TileModel, "__call__", tight_memory)
    with pytest.warns(UserWarning, match="retrying this plane with (256|128)-pixel tiles"):
        result = denoiser.predict(noisy, "YX", ensemble=1, tile_size=512)
    np.testing.assert_allclose(result, expected, atol=agreement(denoiser.device, expected, 1e-5))
    monkeypatch.setattr(TileModel, "__call__", lambda self, batch, inside=None: (_ for _ in ()).throw(
        torch.OutOfMemoryError("simulated")))
    with pytest.raises(MemoryError, match="even with the smallest tile"), pytest.warns(UserWarning):
        denoiser.predict(noisy, "YX", ensemble=1)


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((8, 0), torch.bfloat16)])
def test_gpus_without_fast_bfloat16_get_float16(monkeypatch, capability, expected):
    from napari_tbsn.devices import autocast_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert autocast_dtype(torch.device("cuda")) == expected


def test_options_are_checked_where_they_enter():
    for bad in ({"tile_size": 0}, {"tile_size": -64}, {"batch_size": 0}, {"refine": -1}, {"ensemble": 4},
                {"estimator": "mean"}, {"tile_overlap": -1}, {"tile_size": 100.5}):
        with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
            PredictOptions(**bad)
    for budget in (float("nan"), float("inf"), 0, -5):
        with pytest.raises(ValueError, match="time_budget"):
            Denoiser(preset="tiny").fit(np.ones((64, 64), np.float32), "YX", time_budget=budget)
    with pytest.raises(TypeError, match="unknown prediction option"):
        Denoiser(preset="tiny").prediction_options(tile=3)
