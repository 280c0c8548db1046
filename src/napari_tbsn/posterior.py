"""The Bayesian blind-spot posterior (Laine et al. 2019, "High-Quality Self-Supervised Deep
Image Denoising"), for pixel-independent Gaussian-approximated Poisson-Gaussian noise.

The blind-spot network never sees pixel p, so from p's neighbours it predicts a prior over the
clean value: mean mu and variance v_prior. The mean is fitted by the blind-spot MSE; then,
with the noise model, the noisy observation y is N(mu, v_prior + v_noise(mu)) under the prior,
and v_prior is fitted by its negative log-likelihood (fit_variance_head).
At prediction the posterior mean (y * v_prior + mu * v_noise) / (v_prior + v_noise) folds the
noisy pixel itself back in, which the blind spot had to throw away.

All tensors here are in normalised units, (B, C, H, W); the network's output holds the C means
followed by the C log prior variances.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .progress import FitCancelled, raise_if_cancelled

# exp() of the log-variance head stays within these bounds (normalised units: data spans ~1).
LOG_VARIANCE_RANGE = (-20.0, 4.0)
HEAD_STEPS = 200
HEAD_LEARNING_RATE = 1e-2
HEAD_PATCHES = 16


@dataclass(frozen=True)
class NoiseTerms:
    """A NoiseModel in normalised units, as (1, C, 1, 1) tensors."""

    gain: torch.Tensor
    offset: torch.Tensor
    floor: torch.Tensor

    @classmethod
    def of(cls, gain: np.ndarray, offset: np.ndarray, floor: np.ndarray, device: torch.device) -> "NoiseTerms":
        def shaped(values: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.asarray(values, dtype=np.float32)).reshape(1, -1, 1, 1).to(device)

        return cls(shaped(gain), shaped(offset), shaped(floor))

    extra: torch.Tensor | None = None  # (B, C, H, W): each pixel's read variance above the typical one

    def variance(self, signal: torch.Tensor) -> torch.Tensor:
        line = self.gain * signal + self.offset
        return torch.maximum(line if self.extra is None else line + self.extra, self.floor)

    def with_extra(self, extra: torch.Tensor) -> NoiseTerms:
        """These terms with a per-pixel read variance added (a camera calibration's)."""
        return dataclasses.replace(self, extra=extra)


def posterior_weight(prior: torch.Tensor, noise_variance: torch.Tensor) -> torch.Tensor:
    """How much the posterior mean trusts the noisy pixel: v_prior / (v_prior + v_noise)."""
    return prior / (prior + noise_variance)


def split_output(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, prior variance) from a 2C-channel network output."""
    mean, log_variance = output.float().chunk(2, dim=1)
    return mean, torch.exp(log_variance.clamp(*LOG_VARIANCE_RANGE))


def fit_variance_head(
    network: nn.Module, patches: torch.Tensor, noise: NoiseTerms, steps: int = HEAD_STEPS,
    cancel: threading.Event | None = None,
) -> float:
    """Fit the prior-variance head alone, after the mean: the Gaussian NLL of the noisy patches
    under N(mu, v_prior + v_noise(mu)), on features computed once. Returns the final NLL.

    Trained jointly with the mean, the head stayed far from its optimum (D1, tiny preset: a mean
    prior variance of 1.65 photons^2 against a true blind-spot error of 0.52; the posterior lost
    0.6 dB to the plain mean), and trained through the trunk it pulled the mean down (30.5 ->
    28.4 dB). On frozen features it converges in a few hundred full-batch steps. At the
    optimum, v_prior = E[(y - mu)^2] - v_noise: the blind-spot mean's own error variance.
    """
    config = network.config
    means = network.mean_outputs
    device = network.output_conv.weight.device
    network.eval()
    with torch.no_grad():
        features = torch.cat([network.features(_checked(chunk, cancel).to(device)) for chunk in patches.split(4)]).float()
        weight, bias = network.output_conv.weight, network.output_conv.bias
        mean = network.output(features, weight[:means].float(), bias[:means].float())
        noisy = patches[:, : config.in_channels].to(device).float()  # the rest are context planes
        noise_variance = noise.variance(mean)
        squared_residual = (noisy - mean) ** 2
        excess = _per_row((squared_residual - noise_variance).mean(dim=(0, 2, 3)), means)
        start = torch.log(torch.maximum(excess, 0.05 * _per_row(noise_variance.mean(dim=(0, 2, 3)), means)))
    head_weight = torch.zeros_like(weight[means:], dtype=torch.float32, requires_grad=True)
    head_bias = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([head_weight, head_bias], lr=HEAD_LEARNING_RATE)
    for _ in range(steps):
        raise_if_cancelled(cancel, FitCancelled, "the variance-head fit")
        log_variance = network.output(features, head_weight, head_bias)
        total = torch.exp(log_variance.clamp(*LOG_VARIANCE_RANGE)) + noise_variance
        loss = 0.5 * torch.mean(torch.log(total) + squared_residual / total)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        weight[means:] = head_weight.to(weight)
        bias[means:] = head_bias.to(bias)
    return float(loss.detach())


def _per_row(values: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-channel values for `rows` head rows: as they are, or their mean for the one row that
    channels run as samples share."""
    return values if len(values) == rows else values.mean().reshape(1)


def _checked(chunk: torch.Tensor, cancel: threading.Event | None) -> torch.Tensor:
    raise_if_cancelled(cancel, FitCancelled, "the fit")
    return chunk


@dataclass(frozen=True)
class Estimate:
    """Per-pixel results: the denoised value, its posterior variance (None for the plain mean)
    and an unbiased estimate of its squared error."""

    value: torch.Tensor
    variance: torch.Tensor | None
    squared_error: torch.Tensor


def posterior_estimate(mean: torch.Tensor, prior: torch.Tensor, noisy: torch.Tensor, noise: NoiseTerms,
                       unusable: torch.Tensor | None = None) -> Estimate:
    """The posterior mean and variance, and an unbiased estimate of the posterior's squared error.

    With w = v_prior / (v_prior + v_noise), the estimate is w * y + (1 - w) * mu. The blind spot
    makes mu and w independent of y's own noise, so E[(estimate - clean)^2] =
    w^2 v_noise + (1 - w)^2 E[(mu - clean)^2], and (y - mu)^2 - v_noise estimates the last term
    without clean data (Noise2Self). Where `unusable` is 1 (a hot pixel) y says nothing: the
    estimate is mu, and its error the prior variance.
    """
    mean, noisy = mean.float(), noisy.float()
    noise_variance = noise.variance(mean)
    weight = posterior_weight(prior, noise_variance)
    blind_error = (noisy - mean) ** 2 - noise_variance
    if unusable is not None:
        weight = weight * (1 - unusable)
        blind_error = torch.where(unusable > 0, prior, blind_error)
    value = weight * noisy + (1 - weight) * mean
    squared_error = weight**2 * noise_variance + (1 - weight) ** 2 * blind_error
    variance = weight * noise_variance if unusable is None else torch.where(unusable > 0, prior, weight * noise_variance)
    return Estimate(value, variance, squared_error)


def blind_spot_estimate(mean: torch.Tensor, noisy: torch.Tensor, noise: NoiseTerms | None,
                        unusable: torch.Tensor | None = None) -> Estimate:
    """The plain blind-spot mean; its squared error estimated as (y - mu)^2 - v_noise (not
    where `unusable` is 1: a hot pixel's y says nothing, so nothing is counted there)."""
    mean = mean.float()
    if noise is None:
        error = torch.full_like(mean, float("nan"))
    else:
        error = (noisy.float() - mean) ** 2 - noise.variance(mean)
        if unusable is not None:
            error = error * (1 - unusable)
    return Estimate(mean, None, error)
