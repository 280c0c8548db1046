"""torch.compile in the fit: its time is not fitting time, one graph per mode, any failure
falls back to the eager network. torch.compile is replaced by a stand-in that records its
calls, takes time on its first call (compiling) and fails where a test asks it to, so that the
logic the CUDA path depends on runs on the CPU, fast."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from napari_tbsn import Denoiser
from napari_tbsn.config import FIT_PRESETS
from napari_tbsn.training import COMPILE_MIN_ITERATIONS, COMPILE_MIN_SECONDS, should_compile

from .conftest import noisy_image

COMPILE_SECONDS = 1.5


class _BackwardFails(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor):
        return tensor.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("inductor: backward graph failed to compile")


class FakeCompile:
    """Stands in for torch.compile: the compiled network is the network, timed and watched."""

    def __init__(self, fail_backward: bool = False, fail_at_call: int | None = None) -> None:
        self.fail_backward, self.fail_at_call = fail_backward, fail_at_call
        self.calls: list[tuple[tuple[int, ...], bool, bool]] = []  # (input shape, grad enabled, training)
        self.compiled: list[torch.nn.Module] = []

    def __call__(self, network, dynamic=None, **kwargs):
        self.compiled.append(network)

        def compiled(inputs):
            if not self.calls:
                time.sleep(COMPILE_SECONDS)
            self.calls.append((tuple(inputs.shape), torch.is_grad_enabled(), network.training))
            if self.fail_at_call is not None and len(self.calls) >= self.fail_at_call:
                raise RuntimeError("dynamo: recompilation failed")
            output = network(inputs)
            return _BackwardFails.apply(output) if self.fail_backward and torch.is_grad_enabled() else output

        return compiled


def _fit(monkeypatch, fake: FakeCompile | None, compile: str = "always", **budget) -> Denoiser:
    if fake is not None:
        monkeypatch.setattr(torch, "compile", fake)
    config = dataclasses.replace(FIT_PRESETS["tiny"], compile=compile, validation_every=5,
                                 validation_patches_max=6)  # 6 crops: a chunk of 4 and one of 2
    _, noisy = noisy_image((256, 256))
    return Denoiser(preset="tiny", device="cpu", seed=0, fit_config=config, estimator="blind_spot",
                    lattice=False).fit(noisy, "YX", **budget)


def test_compile_time_is_not_fitting_time(monkeypatch):
    fake = FakeCompile()
    summary = _fit(monkeypatch, fake, time_budget=1.0).summary
    assert summary.compile_seconds >= COMPILE_SECONDS
    # The old code compiled in its first step, inside the budget: one iteration, then time up.
    assert summary.seconds < COMPILE_SECONDS and summary.iterations > 1
    assert "compiling the network" in summary.describe()


def test_one_compiled_graph_for_training_and_one_for_validation(monkeypatch):
    fake = FakeCompile()
    denoiser = _fit(monkeypatch, fake, iterations=12)
    batch = FIT_PRESETS["tiny"].batch_size
    graphs = {(shape, grad, training) for shape, grad, training in fake.calls}
    assert {(grad, training) for _, grad, training in graphs} == {(True, True), (False, False)}
    assert len(graphs) == 2, graphs  # a shorter validation chunk would be a third graph
    assert all(shape[0] == batch for shape, _, _ in graphs)
    assert denoiser.summary.iterations == 12


def test_a_backward_that_fails_to_compile_leaves_the_fit_eager_and_unchanged(monkeypatch):
    with pytest.warns(UserWarning, match="torch.compile failed"):
        failed = _fit(monkeypatch, FakeCompile(fail_backward=True), iterations=8)
    eager = _fit(monkeypatch, None, compile="never", iterations=8)
    assert failed.summary.compile_seconds > 0
    for ours, theirs in zip(failed.model.network.state_dict().values(), eager.model.network.state_dict().values()):
        assert torch.equal(ours, theirs)


def test_a_compiled_network_that_fails_later_goes_on_eager(monkeypatch):
    fake = FakeCompile(fail_at_call=5)  # two calls compile, then steps
    with pytest.warns(UserWarning, match="the compiled network failed"):
        denoiser = _fit(monkeypatch, fake, iterations=10)
    assert denoiser.summary.iterations == 10
    assert len(fake.calls) == 5  # never called again after its failure


def test_a_bug_in_the_eager_network_is_not_taken_for_a_compile_failure(monkeypatch):
    def broken(self, inputs):
        raise ZeroDivisionError("a bug")

    from napari_tbsn.network import TBSN

    monkeypatch.setattr(TBSN, "forward", broken)
    with pytest.raises(ZeroDivisionError):
        _fit(monkeypatch, None, compile="never", iterations=3)


def test_auto_compiles_long_cuda_fits_only():
    auto = FIT_PRESETS["paper"]
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert not should_compile(auto, cpu, None, 3600)
    assert not should_compile(auto, cuda, None, 120)  # a widget fit would spend its time compiling
    assert should_compile(auto, cuda, None, COMPILE_MIN_SECONDS)
    assert should_compile(auto, cuda, COMPILE_MIN_ITERATIONS, None)
    assert not should_compile(auto, cuda, 500, None)
    assert not should_compile(auto, cuda, 500, 3600)  # a small image's pass limit ends the fit early
    assert should_compile(auto, cuda, None, None) == (auto.default_iterations >= COMPILE_MIN_ITERATIONS)
    assert should_compile(dataclasses.replace(auto, compile="always"), cpu, 10, None)
    assert not should_compile(dataclasses.replace(auto, compile="never"), cuda, None, 3600)
