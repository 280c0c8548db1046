"""The self-supervised fitting loop: blind-spot loss on the noisy data itself."""

from __future__ import annotations

import contextlib
import copy
import math
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import FitConfig, TrainingSummary
from .devices import fast_bfloat16
from .noise import pd_down
from .patches import PatchSampler

# Validation may take at most this share of the fitting time. One validation patch costs about
# a third of a training patch (a forward pass without the backward), so a stack with many held-out
# patches validates less often than validation_every asks.
VALIDATION_SHARE = 0.05


@dataclass(frozen=True)
class FitProgress:
    """What the progress callback receives after every iteration."""

    iteration: int
    total_iterations: int | None
    loss: float
    validation_loss: float | None
    best_validation_loss: float | None
    elapsed: float
    eta: float | None
    fraction: float


def blind_spot_loss(output: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the blind-spot prediction and the noisy input.

    For zero-mean pixel-independent noise its expectation is the true MSE plus the noise
    variance (Noise2Self), so the validation loss tracks real quality.
    """
    return torch.mean((output.float() - noisy.float()) ** 2)


def learning_rate_factor(progress: float, config: FitConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_fraction."""
    progress = min(max(progress, 0.0), 1.0)
    warmup = config.warmup_fraction
    if warmup > 0 and progress < warmup:
        return max(progress / warmup, 0.01)
    span = (progress - warmup) / max(1.0 - warmup, 1e-9)
    return config.min_lr_fraction + (1 - config.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * span))


def validation_interval(validation_patches: int, config: FitConfig) -> int:
    """Iterations between validations: config.validation_every, or more where validating that
    often would take more than VALIDATION_SHARE of the time. It depends on sizes only, not on
    timings, so that a seeded fit repeats exactly."""
    cost_ratio = validation_patches / (3 * config.batch_size)  # one validation / one iteration
    return max(config.validation_every, math.ceil(cost_ratio / VALIDATION_SHARE))


class Trainer:
    """Fits a network with AdamW, keeping the weights with the best validation loss."""

    def __init__(
        self,
        network: nn.Module,
        sampler: PatchSampler,
        config: FitConfig,
        device: torch.device,
        pd: int = 1,
        seed: int = 0,
    ) -> None:
        self.network = network
        self.sampler = sampler
        self.config = config
        self.device = device
        self.pd = pd
        self.rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        self.optimizer = torch.optim.AdamW(
            network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.autocast = config.mixed_precision and fast_bfloat16(device)
        self.forward = self._maybe_compile(network)
        self.validation = torch.from_numpy(sampler.validation)
        self.validation_every = validation_interval(len(self.validation), config)
        self._cancel = threading.Event()
        # An exponential moving average of the weights: on short fits it denoises better
        # than the last iterate. Validation, and so the kept best weights, use the average.
        self.parameters = [p for p in network.parameters() if p.requires_grad]
        self.average = [p.detach().clone() for p in self.parameters]

    def _update_average(self, iteration: int) -> None:
        decay = min(self.config.ema_decay, (1 + iteration) / (10 + iteration))
        with torch.no_grad():
            torch._foreach_lerp_(self.average, [p.detach() for p in self.parameters], 1 - decay)

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """Temporarily put the averaged weights into the network."""
        if self.config.ema_decay <= 0:
            yield
            return
        with torch.no_grad():
            current = [p.detach().clone() for p in self.parameters]
            torch._foreach_copy_(self.parameters, self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.parameters, current)

    def _maybe_compile(self, network: nn.Module) -> Callable:
        wanted = self.config.compile == "always" or (self.config.compile == "auto" and self.device.type == "cuda")
        if not wanted or not hasattr(torch, "compile"):
            return network
        try:
            return torch.compile(network, dynamic=False)
        except Exception:  # compilation is an optimisation: never a reason to fail a fit
            return network

    def cancel(self) -> None:
        self._cancel.set()

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        batch = pd_down(batch.to(self.device, non_blocking=True), self.pd)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            try:
                output = self.forward(batch)
            except Exception:
                if self.forward is self.network:
                    raise
                self.forward = self.network  # a compile failure shows at the first call
                output = self.network(batch)
        blind = self.network.config.in_channels  # the rest of the batch is context planes
        return blind_spot_loss(output[:, :blind], batch[:, :blind])

    @torch.no_grad()
    def validation_loss(self) -> float:
        self.network.eval()
        total = 0.0
        for start in range(0, len(self.validation), self.config.batch_size):
            chunk = self.validation[start : start + self.config.batch_size]
            total += float(self._run(chunk)) * len(chunk)
        self.network.train()
        return total / len(self.validation)

    def _validate(self, best_loss: float) -> tuple[float, dict | None]:
        """Validation loss of the averaged weights, and a copy of them if they are the best."""
        with self.averaged_weights():
            loss = self.validation_loss()
            return loss, (copy.deepcopy(self.network.state_dict()) if loss < best_loss else None)

    def run(self, iterations: int | None, time_budget: float | None) -> Generator[FitProgress, None, TrainingSummary]:
        """Train until `iterations` or `time_budget` seconds (whichever comes first) or cancel,
        yielding progress after every iteration; returns the summary."""
        if iterations is None and time_budget is None:
            iterations = self.config.default_iterations
        summary = TrainingSummary()
        best_state = copy.deepcopy(self.network.state_dict())
        best_loss = math.inf
        start = time.perf_counter()

        def fraction_done(iteration: int) -> float:
            return max(
                iteration / iterations if iterations else 0.0,
                (time.perf_counter() - start) / time_budget if time_budget else 0.0,
            )

        def checkpoint(iteration: int, loss_value: float) -> float:
            nonlocal best_loss, best_state
            validation, state = self._validate(best_loss)
            if state is not None:
                best_loss, best_state, summary.best_iteration = validation, state, iteration
            summary.history.append({"iteration": iteration, "loss": loss_value, "validation_loss": validation})
            return validation

        iteration = 0
        validation = None
        self._cancel.clear()
        self.network.train()
        while True:
            fraction = fraction_done(iteration)
            if fraction >= 1.0 or self._cancel.is_set():
                break
            for group in self.optimizer.param_groups:
                group["lr"] = self.config.learning_rate * learning_rate_factor(fraction, self.config)
            batch = torch.from_numpy(self.sampler.sample(self.rng, self.config.batch_size))
            loss = self._run(batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self._update_average(iteration)
            iteration += 1
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"the training loss became {loss_value} at iteration {iteration}; "
                    "lower the learning rate or check the input for extreme values"
                )
            validation = None
            if iteration % self.validation_every == 0 or iteration == iterations:
                validation = checkpoint(iteration, loss_value)
            elapsed = time.perf_counter() - start
            fraction = fraction_done(iteration)
            eta = elapsed * (1 - fraction) / fraction if fraction > 0 else None
            yield FitProgress(
                iteration=iteration,
                total_iterations=iterations,
                loss=loss_value,
                validation_loss=validation,
                best_validation_loss=None if best_loss == math.inf else best_loss,
                elapsed=elapsed,
                eta=max(eta, 0.0) if eta is not None else None,
                fraction=min(fraction, 1.0),
            )
        # The last iterations since the last validation may hold the best weights.
        if iteration > 0 and validation is None:
            checkpoint(iteration, loss_value)
        self.network.load_state_dict(best_state)
        self.network.eval()
        summary.iterations = iteration
        summary.seconds = time.perf_counter() - start
        summary.best_validation_loss = None if best_loss == math.inf else best_loss
        summary.stopped_early = self._cancel.is_set()
        return summary
