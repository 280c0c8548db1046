"""The self-supervised fitting loop: blind-spot loss on the noisy data itself."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import threading
import time
import warnings
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .config import FitConfig, TrainingSummary, describe_plateau
from .devices import OutOfMemory, autocast_dtype, out_of_memory_error
from .errors import UserError, one_line
from .ddp import agree, in_process_group, sum_over_ranks, world
from .noise import pd_down
from .patches import PatchSampler
from .progress import remaining_seconds

MAX_SKIPPED_STEPS = 8  # float16 steps in a row whose loss may be non-finite before the fit counts as diverged

# Validation may take at most this share of the fitting time. One validation patch costs about
# a third of a training patch (a forward pass without the backward), so a stack with many held-out
# patches validates less often than validation_every asks.
VALIDATION_SHARE = 0.05
# Validation has stopped improving when its last clear improvement (KEEP_BAND standard errors) is
# this many iterations old, and at least this share of the iterations run so far: fitting longer
# would then not help, and the fit cools down and ends (COOLDOWN_*).
PLATEAU_ITERATIONS = 200
PLATEAU_SHARE = 0.25
# Held-out pixels (patches.PatchSampler) score every checkpoint on the same pixels, so that two
# checkpoints compare pixel by pixel: a checkpoint whose loss is within this many standard errors
# of that paired difference of the lowest one is kept (the later of two equals: it has seen more
# of the schedule's anneal), and an improvement counts only past it.
KEEP_BAND = 2.0
# Once validation has reached its plateau, the learning rate falls to its floor over this share of
# the iterations run (at least COOLDOWN_MIN), and the fit ends: the anneal of the schedule without
# the fitting of the noise that the rest of a long schedule would do on a small image.
COOLDOWN_SHARE = 0.1
COOLDOWN_MIN = 50
# A validation loss this far above the lowest is a runaway step (a gradient spike the clipping did
# not stop): the fit goes back to its kept weights, clears the optimiser's moments, halves its
# learning rate and warms it up again over REWARM iterations (Adam's first steps from cleared moments
# move every weight by the full rate: at the peak rate, that alone threw S1 off again twice).
RUNAWAY = 1.05
REWARM = 50
# Gradients are clipped to this many times the median norm of the last CLIP_WINDOW steps.
CLIP_FACTOR = 4.0
CLIP_WINDOW = 50
# compile="auto" compiles (on CUDA) only a fit planned for at least this long: compiling the
# training, backward and validation graphs takes tens of seconds, which a 30-120 s widget fit
# would spend waiting, while a long fit earns it back. The clock of the budget starts after it.
COMPILE_MIN_SECONDS = 300.0
COMPILE_MIN_ITERATIONS = 3000  # a fit given iterations instead: ~5 minutes at 10 it/s


def plateau_since(improved_iteration: int, iteration: int) -> int | None:
    """The iteration where validation stopped improving, if it has (else None)."""
    if improved_iteration <= 0:
        return None
    stalled = iteration - improved_iteration
    return improved_iteration if stalled >= max(PLATEAU_ITERATIONS, PLATEAU_SHARE * iteration) else None


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
    plateau: int | None = None  # the iteration where validation stopped improving, once it has
    cooling_down: bool = False  # past the plateau, the fit anneals and ends by itself

    def describe_plateau(self) -> str:
        if self.plateau is None:
            return ""
        ending = "; the fit cools down and ends: more time would not help" if self.cooling_down else ""
        return describe_plateau(self.plateau) + ending


def blind_spot_loss(output: torch.Tensor, noisy: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between the blind-spot prediction and the noisy input (over the
    pixels whose `weights` are 1, where given: the held-out pixels are 0).

    For zero-mean pixel-independent noise its expectation is the true MSE plus the noise
    variance (Noise2Self), so the validation loss tracks real quality.
    """
    errors = squared_errors(output, noisy)
    if weights is None:
        return torch.mean(errors)
    weights = weights.expand_as(errors)
    return torch.sum(errors * weights) / torch.clamp(torch.sum(weights), min=1.0)


def squared_errors(output: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    return (output.float() - noisy.float()) ** 2


def learning_rate_factor(progress: float, config: FitConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_fraction."""
    progress = min(max(progress, 0.0), 1.0)
    warmup = config.warmup_fraction
    if warmup > 0 and progress < warmup:
        return max(progress / warmup, 0.01)
    span = (progress - warmup) / max(1.0 - warmup, 1e-9)
    return config.min_lr_fraction + (1 - config.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * span))


def pass_horizon(training_pixels: int, config: FitConfig, patch_size: int, processes: int = 1) -> int | None:
    """The iterations in which the fit crops config.max_passes times the training pixels (None:
    no limit). A backstop: the held-out pixels' plateau (Trainer) ends a fit that has started to
    learn the noise of a small image long before it (docs/measurements.md, "Fitting time")."""
    if not config.max_passes:
        return None
    per_iteration = config.batch_size * patch_size**2 * processes
    return max(1, math.ceil(config.max_passes * training_pixels / per_iteration))


def should_compile(config: FitConfig, device: torch.device, iterations: int | None, time_budget: float | None) -> bool:
    """Whether a fit compiles its network: compile="always", or "auto" on CUDA for a fit long
    enough to earn the compile time back (COMPILE_MIN_SECONDS, COMPILE_MIN_ITERATIONS)."""
    if config.compile == "never" or not hasattr(torch, "compile"):
        return False
    if config.compile == "always":
        return True
    # `iterations`: asked for, or the data's pass limit, which ends a fit of any budget early.
    planned = iterations if iterations is not None else None if time_budget is not None else config.default_iterations
    long_enough = ((time_budget is None or time_budget >= COMPILE_MIN_SECONDS)
                   and (planned is None or planned >= COMPILE_MIN_ITERATIONS))
    return device.type == "cuda" and long_enough


def validation_interval(validation_patches: int, config: FitConfig) -> int:
    """Iterations between validations: config.validation_every, or more where validating that
    often would take more than VALIDATION_SHARE of the time. It depends on sizes only, not on
    timings, so that a seeded fit repeats exactly."""
    cost_ratio = validation_patches / (3 * config.batch_size)  # one validation / one iteration
    return max(config.validation_every, math.ceil(cost_ratio / VALIDATION_SHARE))


class Trainer:
    """Fits a network with AdamW, keeping the weights with the best validation loss.

    The network it is given is changed in place: give it a copy of one worth keeping. Training
    ends early when `cancel` is set (the whole job stops) or `stop_training` is (the fit goes on
    to its closing phases); it never clears either."""

    def __init__(
        self,
        network: nn.Module,
        sampler: PatchSampler,
        config: FitConfig,
        device: torch.device,
        pd: int = 1,
        seed: int = 0,
        cancel: threading.Event | None = None,
        stop_training: threading.Event | None = None,
        objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        inputs: int | None = None,
        forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
        horizon: int | None = None,
    ) -> None:
        """By default the network is fitted blind-spot: it reads the whole batch (the plane,
        then its context planes) and the loss compares its output to the noisy plane. Another
        `objective(output, batch)` (distillation: output against the teacher's channels after
        the first `inputs`) and `forward` can be given. `horizon`: the most iterations the data
        call for (see pass_horizon); the schedule then completes there even with time left."""
        self.network = network
        self.sampler = sampler
        self.config = config
        self.device = device
        self.pd = pd
        self.rank, self.processes = world()
        # Under DDP every rank samples its own patches (rank 0 as a single process would).
        self.rng = np.random.default_rng(seed if self.rank == 0 else (seed, self.rank))
        torch.manual_seed(seed)
        self.optimizer = torch.optim.AdamW(
            network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.autocast = autocast_dtype(device) if config.mixed_precision else None
        # float16 needs its gradients scaled so that small ones do not underflow; bfloat16 does not.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast == torch.float16)
        self.forward = forward or network
        self.compiled = False  # run() compiles, where it pays, before its clock starts
        self.may_compile = forward is None
        if in_process_group():  # under torchrun, even with one process
            if forward is not None:
                raise UserError("distillation runs in one process: run it without torchrun")
            # DDP averages every step's gradients over the ranks (and starts them from rank 0's weights).
            # broadcast_buffers=False: the network's buffers are constants (masks, indices), the same
            # on every rank, so sending rank 0's before every forward pass is pure overhead.
            self.forward = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None,
                                                   broadcast_buffers=False)
            self.may_compile = False
        self.objective = objective or self._blind_spot_objective
        self.horizon = horizon
        self.inputs = inputs
        self.validation = torch.from_numpy(sampler.validation)
        masks = sampler.validation_masks
        # Held-out pixels (the blind-spot fit): scored alone, checkpoints compared pixel by pixel,
        # gradients clipped and runaways undone. Else (distillation) each patch scores as a whole.
        self.validation_masks = None if masks is None else torch.from_numpy(masks)[:, None]
        self.guarded = masks is not None
        self.keep_band = KEEP_BAND if self.guarded else 0.0
        self.validation_every = validation_interval(len(self.validation), config)
        self.learning_rate_scale = 1.0  # halved after each runaway
        self.rewarm_from: int | None = None  # the last runaway's iteration
        self.gradient_norms: list[float] = []
        self.cancel_token = cancel if cancel is not None else threading.Event()
        self.stop_training = stop_training if stop_training is not None else threading.Event()
        self.batch_size = config.batch_size
        self.patch_size = sampler.patch_size
        self.granularity = getattr(network, "size_multiple", 1) * pd
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

    def compile(self) -> float:
        """Compile the network, and run its training graph (forward and backward) and its
        validation graph once on a batch of zeros, so that the compile time is spent here and not
        in the first steps (run() starts its clock after this). Any failure leaves the fit eager,
        with a warning. Returns the seconds spent."""
        start = time.perf_counter()
        self.network.train()  # the mode the steps run in (a fine-tune's copy comes in eval mode)
        try:
            compiled = torch.compile(self.network, dynamic=False)
            channels = self.validation.shape[1]
            batch = torch.zeros((self.batch_size, channels, self.patch_size, self.patch_size))
            self._run(batch, compiled).backward()
            self.network.eval()
            with torch.no_grad():
                self._run(batch, compiled)
            self.forward, self.compiled = compiled, True
        except Exception as error:  # an optimisation: never a reason to fail a fit
            warnings.warn(f"torch.compile failed ({one_line(error)}); fitting without it", stacklevel=2)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.network.train()
        return time.perf_counter() - start

    def _without_compile(self, error: Exception) -> None:
        """After the compiled network failed (a recompile for a new shape, say): go on eager."""
        if not self.compiled or isinstance(error, OutOfMemory):
            raise error
        warnings.warn(f"the compiled network failed ({one_line(error)}); fitting on without it", stacklevel=3)
        self.forward, self.compiled = self.network, False
        self.optimizer.zero_grad(set_to_none=True)

    def cancel(self) -> None:
        self.cancel_token.set()

    def _blind_spot_objective(self, output: torch.Tensor, batch: torch.Tensor,
                              weights: torch.Tensor | None = None) -> torch.Tensor:
        blind = self.network.blind_inputs(batch)  # the rest of the batch is context planes
        return blind_spot_loss(output[:, :blind], batch[:, :blind], weights)

    def _output(self, batch: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            return (forward or self.forward)(batch[:, : self.inputs])

    def _run(self, batch: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
             weights: torch.Tensor | None = None) -> torch.Tensor:
        """The objective on a batch; `weights` (B, 1, P, P): 0 on the held-out pixels, which the
        loss must never see (the blind-spot fit's only)."""
        batch = pd_down(batch.to(self.device, non_blocking=True), self.pd)
        output = self._output(batch, forward)
        if weights is None:
            return self.objective(output, batch)
        return self._blind_spot_objective(output, batch, pd_down(weights.to(self.device, non_blocking=True), self.pd))

    def _held_out_errors(self, chunk: torch.Tensor, masks: torch.Tensor,
                         forward: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        """The squared errors of the blind-spot prediction at the held-out pixels of a chunk of
        validation crops (every blind channel of each)."""
        batch = pd_down(chunk.to(self.device, non_blocking=True), self.pd)
        output = self._output(batch, forward)
        blind = self.network.blind_inputs(batch)
        errors = squared_errors(output[:, :blind], batch[:, :blind])
        held = pd_down(masks.to(self.device, non_blocking=True), self.pd).expand_as(errors)
        return errors[held].double().cpu()

    @torch.no_grad()
    def validation_errors(self) -> torch.Tensor:
        """This rank's validation errors, in a fixed order (float64): the squared errors at the
        held-out pixels, or (without them) each validation patch's chunk's loss. Crops are cut to the
        training patch size, which an out-of-memory error may have shrunk; retried smaller after one."""
        self.network.eval()
        try:
            while True:
                try:
                    errors = []
                    share = self.validation[self.rank :: self.processes]  # under DDP each rank validates its share
                    masks = None if self.validation_masks is None else \
                        self.validation_masks[self.rank :: self.processes]
                    size = self.patch_size
                    for start in range(0, len(share), self.batch_size):
                        chunk = share[start : start + self.batch_size, :, :size, :size]
                        # A shorter last chunk runs eager (compiled, it would compile anew); under DDP
                        # the plain network, since the ranks run different numbers of chunks.
                        eager = self.network if len(chunk) != self.batch_size or self.processes > 1 else None
                        if masks is not None:
                            errors.append(self._held_out_errors(chunk, masks[start : start + len(chunk), :, :size, :size],
                                                                eager))
                        else:  # the chunk's loss, once per patch (their mean is the mean loss)
                            errors.append(torch.full((len(chunk),), float(self._run(chunk, eager)), dtype=torch.float64))
                    return torch.cat(errors) if errors else torch.zeros(0, dtype=torch.float64)
                except OutOfMemory as error:
                    self._shrink(error)
                except Exception as error:
                    self._without_compile(error)
        finally:
            self.network.train()

    def validation_loss(self) -> float:
        """The mean validation error over all ranks."""
        return self._mean_over_ranks(self.validation_errors())[1]

    def _mean_over_ranks(self, errors: torch.Tensor) -> tuple[int, float]:
        """How many validation errors all ranks hold, and their mean."""
        count = sum_over_ranks(len(errors), self.device)
        return count, sum_over_ranks(float(errors.sum()), self.device) / max(count, 1)

    def _shrink(self, error: Exception) -> None:
        """After running out of memory: halve the batch, else the patch, and say so."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.processes > 1:  # one rank alone cannot redo a step the others have synchronised
            raise out_of_memory_error(self.device, "fitting with DDP (give a smaller --batch-size or --patch-size)") \
                from error
        if self.batch_size > 1:
            self.batch_size //= 2
            change = f"batch size {self.batch_size}"
        elif self.patch_size // 2 >= self.granularity and (self.patch_size // 2) % self.granularity == 0:
            self.patch_size //= 2
            change = f"{self.patch_size}-pixel patches"
        else:
            raise out_of_memory_error(self.device, "fitting, even with one patch of the smallest size") from error
        warnings.warn(f"{self.device.type.upper()} ran out of memory while fitting; continuing with {change}",
                      stacklevel=2)
        # A float16 step cut short may leave the scaler half way through; start it afresh.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast == torch.float16)

    def _step(self, learning_rate: float) -> float:
        """One optimisation step on a fresh batch; retried smaller after an out-of-memory error."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        while True:
            batch, weights = self.sampler.sample_with_mask(self.rng, self.batch_size)
            batch = torch.from_numpy(batch)[..., : self.patch_size, : self.patch_size]
            if weights is not None:
                weights = torch.from_numpy(weights)[..., : self.patch_size, : self.patch_size]
            try:
                loss = self._run(batch, weights=weights)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if self.guarded:
                    self._clip_gradients()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                return float(loss.detach())
            except OutOfMemory as error:
                self.optimizer.zero_grad(set_to_none=True)
                self._shrink(error)
            except Exception as error:  # a compiled network's failure is retried eager (a bug is raised)
                self._without_compile(error)

    def _clip_gradients(self) -> None:
        """Clip the gradients to CLIP_FACTOR times the median norm of the last CLIP_WINDOW steps
        (once there are that many): one spike, on a small image at the schedule's peak rate, can
        otherwise throw a fit far off (docs/measurements.md, "Fitting time")."""
        self.scaler.unscale_(self.optimizer)
        ready = len(self.gradient_norms) >= CLIP_WINDOW
        limit = CLIP_FACTOR * float(np.median(self.gradient_norms)) if ready else math.inf
        norm = float(nn.utils.clip_grad_norm_(self.parameters, limit))
        if math.isfinite(norm):  # a float16 overflow, which the scaler skips, is no norm
            self.gradient_norms = self.gradient_norms[-(CLIP_WINDOW - 1):] + [norm]

    def run(self, iterations: int | None, time_budget: float | None) -> Generator[FitProgress, None, TrainingSummary]:
        """Train until `iterations` or `time_budget` seconds (whichever comes first), cancel, or a
        cooldown after validation's plateau, yielding progress after every iteration; returns the
        summary. The network ends with the kept weights (the averaged ones of the latest checkpoint
        within KEEP_BAND standard errors of the lowest validation loss)."""
        if iterations is None and time_budget is None:
            iterations = self.config.default_iterations
        summary = TrainingSummary()
        if self.horizon is not None and (iterations is None or self.horizon < iterations):
            # The data's own limit: the schedule completes there, whatever time is left.
            iterations, summary.pass_limit = self.horizon, self.horizon
        best = _Best(copy.deepcopy(self.network.state_dict()))
        if self.may_compile and should_compile(self.config, self.device, iterations, time_budget):
            summary.compile_seconds = self.compile()  # before the clock: compiling is not fitting time
        start = time.perf_counter()
        cooldown: _Cooldown | None = None

        def fraction_done(iteration: int) -> float:
            return max(iteration / iterations if iterations else 0.0,
                       (time.perf_counter() - start) / time_budget if time_budget else 0.0,
                       iteration / cooldown.end if cooldown is not None else 0.0)

        def progress(iteration: int, diverged: bool) -> tuple[float, bool, bool]:
            # Under DDP the ranks agree on all three, so that they step, validate and stop together.
            stopping = self.cancel_token.is_set() or self.stop_training.is_set()
            return agree(fraction_done(iteration), stopping, diverged, self.device)

        # float16's loss scaler skips a step whose gradients overflowed and lowers its scale: a few
        # non-finite steps in a row are its normal work, not a diverged fit.
        tolerated = MAX_SKIPPED_STEPS if self.scaler.is_enabled() else 0
        iteration, validation, loss, non_finite = 0, None, math.nan, 0
        self.network.train()
        while True:
            done, stopping, diverged = progress(iteration, non_finite > tolerated)
            if diverged:
                raise FloatingPointError(f"the training loss became {loss} at iteration {iteration}; "
                                         "lower the learning rate or check the input for extreme values")
            if done >= 1.0 or stopping:
                break
            factor = cooldown.factor(iteration) if cooldown is not None else learning_rate_factor(done, self.config)
            rewarm = min(1.0, max(iteration - self.rewarm_from, 1) / REWARM) if self.rewarm_from is not None else 1.0
            loss = self._step(self.config.learning_rate * self.learning_rate_scale * factor * rewarm)
            self._update_average(iteration)
            iteration += 1
            non_finite = 0 if math.isfinite(loss) else non_finite + 1
            if non_finite > tolerated and self.processes == 1:
                raise FloatingPointError(f"the training loss became {loss} at iteration {iteration}; "
                                         "lower the learning rate or check the input for extreme values")
            validation = None
            end = cooldown.end if cooldown is not None else iterations
            if iteration % self.validation_every == 0 or iteration == end:
                validation = self._checkpoint(best, summary, iteration, loss, last=iteration == end)
                plateau = best.plateau(iteration)
                if self.guarded and cooldown is None and plateau is not None:
                    cooldown = _Cooldown.after(iteration, factor, self.config.min_lr_fraction, iterations)
                    if cooldown is not None:
                        summary.plateau_iteration = plateau
            elapsed, fraction = time.perf_counter() - start, fraction_done(iteration)
            yield FitProgress(iteration, iterations, loss, validation, best.loss_or_none, elapsed,
                              remaining_seconds(elapsed, fraction), min(fraction, 1.0),
                              summary.plateau_iteration if cooldown is not None else best.plateau(iteration),
                              cooldown is not None)
        if iteration > 0 and validation is None:  # the iterations since the last validation may hold the best
            self._checkpoint(best, summary, iteration, loss, last=True)
        self.network.load_state_dict(best.state)
        self.network.eval()
        summary.iterations = iteration
        summary.processes = self.processes
        summary.seconds = time.perf_counter() - start
        summary.best_validation_loss = best.loss_or_none
        summary.stopped_early = self.cancel_token.is_set() or self.stop_training.is_set()
        if summary.plateau_iteration is None:
            summary.plateau_iteration = best.plateau(iteration)
        return summary

    def _checkpoint(self, best: _Best, summary: TrainingSummary, iteration: int, loss: float,
                    last: bool = False) -> float:
        """Validate the averaged weights, keep them where they are no worse than the lowest (within
        the keep band), and undo a runaway (unless this is the `last` checkpoint: the fit ends with
        the kept weights anyway). Returns the validation loss."""
        with self.averaged_weights():
            errors = self.validation_errors()
            count, validation = self._mean_over_ranks(errors)
            if not self.guarded:  # the lowest validation loss, as distillation always kept
                keep = improved = validation < best.lowest
            elif best.errors is None or len(best.errors) != len(errors):
                # The first checkpoint, or crops an out-of-memory error shrank: it starts the comparisons.
                keep = improved = True
                best.lowest = math.inf
            else:
                # Kept: no worse than the lowest. Improved: better than the checkpoint of the last
                # improvement (not the lowest since, which a slow steady gain moves every time).
                mean, margin = self._paired(errors, best.errors, count)
                keep = mean <= margin
                mean, margin = self._paired(errors, best.reference, count)
                improved = mean < -margin
            if improved:
                best.reference, best.improved = errors, iteration
            if validation < best.lowest:
                best.lowest, best.errors = validation, errors
            if keep:
                best.loss, best.state, summary.best_iteration = validation, copy.deepcopy(self.network.state_dict()), \
                    iteration
        summary.history.append({"iteration": iteration, "loss": loss, "validation_loss": validation})
        if self.guarded and not last and not validation <= RUNAWAY * best.lowest:  # NaN included
            self._undo_runaway(best, iteration)
            summary.runaways += 1
        return validation

    def _paired(self, errors: torch.Tensor, reference: torch.Tensor, count: int) -> tuple[float, float]:
        """The mean of errors - reference over all ranks, and keep_band standard errors of it."""
        difference = errors - reference
        mean = sum_over_ranks(float(difference.sum()), self.device) / max(count, 1)
        spread = sum_over_ranks(float((difference**2).sum()), self.device) / max(count, 1) - mean**2
        return mean, self.keep_band * math.sqrt(max(spread, 0.0) / max(count, 1))

    def _undo_runaway(self, best: _Best, iteration: int) -> None:
        """Back to the kept weights (averaged and current), with fresh optimiser moments and half
        the learning rate, warmed up again; the plateau's clock starts again (a restart)."""
        self.network.load_state_dict(best.state)
        with torch.no_grad():
            torch._foreach_copy_(self.average, [p.detach() for p in self.parameters])
        self.optimizer.state.clear()
        self.learning_rate_scale /= 2
        self.rewarm_from = iteration
        best.restarted = iteration


@dataclasses.dataclass
class _Best:
    state: dict  # the kept weights
    loss: float = math.inf  # their validation loss
    lowest: float = math.inf  # the lowest validation loss reached
    errors: torch.Tensor | None = None  # the lowest one's validation errors (this rank's)
    improved: int = 0  # the iteration of the last clear improvement
    reference: torch.Tensor | None = None  # its validation errors (this rank's)
    restarted: int = 0  # the iteration of the last runaway: the plateau's clock starts again there

    def plateau(self, iteration: int) -> int | None:
        """The last improvement's iteration, once validation has stalled since it (and since
        the last restart)."""
        return None if plateau_since(max(self.improved, self.restarted), iteration) is None else self.improved

    @property
    def loss_or_none(self) -> float | None:
        return None if self.loss == math.inf else self.loss


@dataclasses.dataclass(frozen=True)
class _Cooldown:
    """After the plateau: the learning rate falls from where it was to its floor, then the fit ends."""

    start: int
    length: int
    factor_at_start: float
    floor: float

    @classmethod
    def after(cls, iteration: int, factor: float, floor: float, iterations: int | None) -> _Cooldown | None:
        """A cooldown from `iteration`, or None where the schedule ends sooner anyway."""
        length = max(COOLDOWN_MIN, math.ceil(COOLDOWN_SHARE * iteration))
        if iterations is not None and iteration + length >= iterations:
            return None
        return cls(iteration, length, factor, min(floor, factor))

    @property
    def end(self) -> int:
        return self.start + self.length

    def factor(self, iteration: int) -> float:
        span = min(max((iteration - self.start) / self.length, 0.0), 1.0)
        return self.floor + (self.factor_at_start - self.floor) * 0.5 * (1 + math.cos(math.pi * span))
