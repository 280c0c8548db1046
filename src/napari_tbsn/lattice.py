"""Lattice refinement: give back the pixels that TBSN's dilated blind spot skips.

TBSN's output at p never sees the whole lattice p + 2Z^2 (a quarter of all pixels), not only
p itself. A blind-spot estimate (Noise2Self) need only stay blind to the noisy value y_p. The
network's mean mu at a lattice neighbour q = p + d (d even, d != 0) is blind to q + 2Z^2, which
holds p, so its residual y_q - mu_q carries no trace of y_p, and the network's errors are
spatially correlated (D1, small preset: 0.2 at a distance of 2 pixels). So a small linear filter
over the lattice corrects the mean:

    mu'_p = mu_p + sum_k a_k sum_{d in class k} w_{p+d} (y_{p+d} - mu_{p+d})
                 + sum_k b_k sum_{d in class k} (mu_{p+d} - mu_p)

The classes group the even offsets within REACH by their length up to flips and rotations
(5 classes for REACH 4). w = v_prior / (v_prior + v_noise) is the posterior's weight of the
noisy pixel (1 without a variance head), so very noisy neighbours count less. a and b, 2 x 5
numbers per channel, minimise the blind-spot loss |mu' - y|^2 on training patches: mu' is still
blind to y_p, so that loss still equals the true error plus the noise variance, and the fit is a
linear least-squares problem. Measured on D1 (small, 300 s, the same model, x8 ensemble): plain
mean 30.63 -> 30.77 dB, posterior 30.95 -> 31.09 dB.

Where the camera's line offsets (camera.py) are taken out, each line's offset on p's lattice was
measured on that lattice, p included, so the residuals there read y_p. A filter fitted with
`line` ("rows" or "columns") reads them centred instead: each neighbour's residual less the mean
residual along its own line (LINE_REACH lattice pixels on either side, p left out), all taken from
the plane before its line offsets came out. A line's offset is common to the line, so it leaves
the centred residual, and with it any trace of y_p; the centring also keeps the filter from
putting a line's offset back into the output, which the blind-spot loss would reward.

Residuals outside the image are zero. The predictor pads the image by reflection, and a
reflected copy of y_p can sit on p's own lattice, where this filter would read it.

Beyond a tile's edge (an image edge or a seam between tiles) the means are mirrored about the
edge pixel (MEAN_PADDING): a mirrored offset keeps its parity, so p + d still reads a mean of
p's own lattice, blind to y_p. Replicating the edge pixel would not: at an odd offset from the
edge it hands p a mean that saw y_p (a tile seam with no overlap to blend it away leaked).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .camera import FAR_SPACING
from .posterior import NoiseTerms, posterior_weight, split_output
from .progress import FitCancelled, raise_if_cancelled

REACH = 4
LATTICE_PATCHES = 32  # training patches the filter is fitted on
FIT_BORDER = 8  # pixels this close to a patch edge lack context and are left out of the fit
MEAN_PADDING = "reflect"  # parity-preserving; "replicate" or "symmetric" would break the blind spot
LINE_REACH = 16  # lattice pixels on either side of a neighbour that its line's mean residual takes
# The lattice offsets whose hot-pixel decision, on a single image that decides on itself, read p
# (camera.FAR_SPACING): a `far` filter reads no residual there.
FAR_OFFSETS = frozenset((dy, dx) for dy in (-FAR_SPACING, 0, FAR_SPACING) for dx in (-FAR_SPACING, 0, FAR_SPACING)
                        if dy or dx)


def _offsets_within(reach: int) -> list[tuple[int, int]]:
    return [(dy, dx) for dy in range(-reach, reach + 1, 2) for dx in range(-reach, reach + 1, 2) if dy or dx]


def offset_classes(reach: int = REACH) -> list[list[tuple[int, int]]]:
    """The non-zero even offsets (dy, dx) within `reach`, grouped by (|dy|, |dx|) up to order."""
    offsets = _offsets_within(reach)
    keys = sorted({tuple(sorted((abs(dy), abs(dx)))) for dy, dx in offsets})
    return [[o for o in offsets if tuple(sorted((abs(o[0]), abs(o[1])))) == key] for key in keys]


def class_kernels(reach: int = REACH) -> torch.Tensor:
    """(K, 1, 2 reach + 1, 2 reach + 1): kernel k is 1 at the offsets of class k."""
    classes = offset_classes(reach)
    kernels = torch.zeros(len(classes), 1, 2 * reach + 1, 2 * reach + 1, dtype=torch.float64)
    for k, offsets in enumerate(classes):
        for dy, dx in offsets:
            kernels[k, 0, reach + dy, reach + dx] = 1.0
    return kernels


def residual_weight(prior: torch.Tensor | None, noise_variance: torch.Tensor | None) -> torch.Tensor | float:
    """The weight of a neighbour's residual: the posterior's weight of its noisy pixel, or 1."""
    if prior is None or noise_variance is None:
        return 1.0
    return posterior_weight(prior, noise_variance)


def _shifted(planes: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., y, x] = planes[..., y + dy, x + dx], zero beyond the edges (no arithmetic: an
    exact copy)."""
    height, width = planes.shape[-2:]
    padded = F.pad(planes, [max(-dx, 0), max(dx, 0), max(-dy, 0), max(dy, 0)])
    top, left = max(dy, 0), max(dx, 0)
    return padded[..., top : top + height, left : left + width]


def centred_residual_features(residual: torch.Tensor, usable: torch.Tensor, weight: torch.Tensor | float,
                              reach: int, line: str, line_reach: int = LINE_REACH, far: bool = False) -> torch.Tensor:
    """(B, C * K, H, W): per offset class k, the sum over its offsets d of w_q (r_q - m(p, d_y)) at
    q = p + d, where m(p, d_y) is the mean residual along the line through p + (d_y, 0) over the
    lattice pixels within `line_reach` of p (p itself left out) and `usable` (B, 1 or C, H, W)
    marks the residuals that may be read (1) at all; `far` leaves p + FAR_OFFSETS out of the
    means too (and the caller's coefficients leave them out of the sums). For "columns" the roles
    of y and x swap.
    No sum ever holds r_p, not even times zero (shifted copies, not a convolution): blind to y_p
    in floating point too, on any device."""
    if line == "columns":
        residual, usable = residual.transpose(-1, -2), usable.transpose(-1, -2)
        weight = weight.transpose(-1, -2) if torch.is_tensor(weight) else weight
    usable = usable.expand_as(residual).to(residual)
    values = residual * usable
    # Along a line, the lattice pixels within line_reach but those at p's place and FAR_SPACING off
    # it; then each line adds those it may read: p's own never p, a `far` filter's never p + FAR_OFFSETS.
    sums, counts = torch.zeros_like(values), torch.zeros_like(values)
    for step in range(1, line_reach + 1):
        for dx in (-2 * step, 2 * step) if 2 * step != FAR_SPACING else ():
            sums, counts = sums + _shifted(values, 0, dx), counts + _shifted(usable, 0, dx)
    near_sums, near_counts = sums, counts
    if 2 * line_reach >= FAR_SPACING:
        for dx in (-FAR_SPACING, FAR_SPACING):
            near_sums, near_counts = near_sums + _shifted(values, 0, dx), near_counts + _shifted(usable, 0, dx)

    def mean(dy: int) -> torch.Tensor:
        if far and abs(dy) in (0, FAR_SPACING):  # p + FAR_OFFSETS: on p's line, and FAR_SPACING lines off
            total, count = sums, counts
        elif dy:
            total, count = near_sums + values, near_counts + usable
        else:
            total, count = near_sums, near_counts
        return _shifted(total, dy, 0) / _shifted(count, dy, 0).clamp_min(1.0)

    weighted = weight * usable
    means = {dy: mean(dy) for dy in range(-reach, reach + 1, 2)}
    features = []
    for offsets in offset_classes(reach):  # shifted copies, not a convolution: nothing times zero
        read = [(dy, dx) for dy, dx in offsets if not (far and (dy, dx) in FAR_OFFSETS)]
        features.append(sum((_shifted(weighted, dy, dx) * (_shifted(residual, dy, dx) - means[dy])
                             for dy, dx in read), torch.zeros_like(residual)))
    features = torch.stack(features, dim=2).flatten(1, 2)  # (B, C * K, H, W), channel by channel
    return features.transpose(-1, -2) if line == "columns" else features


def _filter(planes: torch.Tensor, kernels: torch.Tensor, reach: int, mode: str) -> torch.Tensor:
    """Each channel of (B, C, H, W) through its own group of the (C*K, 1, k, k) kernels (K per
    channel, K >= 1), padded by `reach` with `mode` -> (B, C*K, H, W)."""
    channels = planes.shape[1]
    return F.conv2d(F.pad(planes, [reach] * 4, mode=mode), kernels.to(planes), groups=channels)


@dataclass(frozen=True)
class LatticeFilter:
    """Per channel, K residual weights then K mean-difference weights (K offset classes), and
    the factor that rescales the network's prior variance to the refined mean's error."""

    coefficients: tuple[tuple[float, ...], ...]
    reach: int = REACH
    prior_scale: tuple[float, ...] = ()  # per channel; empty: 1
    line: str = ""  # "rows" or "columns": residuals centred along those lines (line offsets taken out)
    line_reach: int = LINE_REACH  # lattice pixels on either side that a line's mean residual takes
    far: bool = False  # reads no residual at FAR_OFFSETS (fitted on single images that decide on themselves)

    def reads_blindly(self, lines: tuple[str, ...]) -> bool:
        """Whether the filter stays blind to y_p beside a camera correction that took out the
        offsets of `lines` (each measured on p's own lattice, p included): only where its
        residuals are centred along them."""
        return not lines or tuple(lines) == (self.line,)

    def scale_prior(self, prior: torch.Tensor) -> torch.Tensor:
        if not self.prior_scale:
            return prior
        return prior * torch.tensor(self.prior_scale, dtype=prior.dtype, device=prior.device).reshape(1, -1, 1, 1)

    def _kernels(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        basis = class_kernels(self.reach)
        classes = basis.shape[0]
        counts = basis.sum(dim=(1, 2, 3))
        coefficients = torch.tensor(self.coefficients, dtype=torch.float64)
        if coefficients.shape != (channels, 2 * classes):
            raise ValueError(f"the lattice filter has coefficients for shape {tuple(coefficients.shape)}, "
                             f"the network gives {channels} channel(s)")
        residual = torch.einsum("ck,kihw->cihw", coefficients[:, :classes], basis)
        if self.far:  # exactly zero there, whatever the coefficients
            for dy, dx in FAR_OFFSETS & set(_offsets_within(self.reach)):
                residual[:, 0, self.reach + dy, self.reach + dx] = 0.0
        difference = torch.einsum("ck,kihw->cihw", coefficients[:, classes:], basis)
        difference[:, 0, self.reach, self.reach] = -(coefficients[:, classes:] * counts).sum(dim=1)
        return residual, difference

    def apply(
        self, mean: torch.Tensor, noisy: torch.Tensor, weight: torch.Tensor | float, inside: torch.Tensor | None,
        unusable: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The corrected mean. `inside` (B, 1, H, W) marks pixels of the image (1) against its
        reflected padding (0); None means all of it is image. `weight` is 0 where a pixel is
        `unusable` (B, C, H, W: 1 where its value is never read). A filter with a `line` reads
        `noisy` as the plane before its line offsets came out (centred_residual_features)."""
        residual_kernel, difference_kernel = self._kernels(mean.shape[1])
        differences = _filter(mean, difference_kernel, self.reach, MEAN_PADDING)
        if self.line:
            usable = inside if inside is not None else torch.ones_like(mean[:, :1])
            usable = usable if unusable is None else usable * (1 - unusable)
            features = centred_residual_features(noisy - mean, usable, weight, self.reach, self.line, self.line_reach,
                                                 self.far)
            classes = len(self.coefficients[0]) // 2
            weights = torch.tensor([c[:classes] for c in self.coefficients], dtype=mean.dtype, device=mean.device)
            residuals = torch.einsum("bckhw,ck->bchw", features.unflatten(1, (mean.shape[1], classes)), weights)
        else:
            residual = weight * (noisy - mean)
            if inside is not None:
                residual = residual * inside
            residuals = _filter(residual, residual_kernel, self.reach, "constant")
        return mean + residuals + differences

    @classmethod
    def fit(
        cls, mean: torch.Tensor, noisy: torch.Tensor, weight: torch.Tensor | float, border: int = FIT_BORDER,
        reach: int = REACH, line: str = "", line_reach: int = LINE_REACH, far: bool = False,
    ) -> LatticeFilter:
        """Least squares of the blind-spot loss over patches (B, C, H, W), away from their edges
        (patches in the plane's own orientation where there is a `line`)."""
        basis = class_kernels(reach)
        channels, classes = mean.shape[1], basis.shape[0]
        mean, noisy = mean.double(), noisy.double()
        weight = weight.double() if torch.is_tensor(weight) else weight
        stacked = basis.repeat(channels, 1, 1, 1)
        residual = (centred_residual_features(noisy - mean, torch.ones_like(mean[:, :1]), weight, reach, line,
                                              line_reach, far)
                    if line else _filter(weight * (noisy - mean), stacked, reach, "constant"))
        # A far filter's classes that lie on FAR_OFFSETS are left out of the least squares (zero).
        kept = [k for k in range(2 * classes)
                if not (far and k < classes and set(offset_classes(reach)[k]) <= FAR_OFFSETS)]
        features = torch.cat([
            residual.unflatten(1, (channels, classes)),
            (_filter(mean, stacked, reach, MEAN_PADDING).unflatten(1, (channels, classes))
             - basis.sum(dim=(1, 2, 3)).reshape(1, 1, classes, 1, 1) * mean.unsqueeze(2)),
        ], dim=2)
        inner = (slice(None), slice(None), slice(border, -border or None), slice(border, -border or None))
        target = (noisy - mean)[inner]
        features = features[(*inner[:2], slice(None), *inner[2:])]
        coefficients = []
        for channel in range(channels):
            x = features[:, channel].movedim(1, -1).reshape(-1, 2 * classes)[:, kept]
            t = target[:, channel].reshape(-1)
            gram = x.T @ x
            # A whisper of ridge keeps a flat patch set from making the system singular.
            gram += 1e-9 * gram.diagonal().mean().clamp_min(1e-30) * torch.eye(len(kept), dtype=gram.dtype)
            solution = torch.zeros(2 * classes, dtype=torch.float64)
            solution[kept] = torch.linalg.solve(gram, x.T @ t)
            coefficients.append(tuple(float(v) for v in solution))
        return cls(tuple(coefficients), reach, line=line, line_reach=line_reach, far=far)

    def to_dict(self) -> dict:
        return {"coefficients": [list(c) for c in self.coefficients], "reach": self.reach,
                "prior_scale": list(self.prior_scale), "line": self.line, "line_reach": self.line_reach,
                "far": self.far}

    @classmethod
    def from_dict(cls, values: dict) -> LatticeFilter:
        coefficients = tuple(tuple(float(v) for v in c) for c in values["coefficients"])
        prior_scale = tuple(float(v) for v in values.get("prior_scale", ()))
        line = str(values.get("line", ""))
        if line not in ("", "rows", "columns"):
            raise ValueError(f"unknown line {line!r}")
        line_reach = int(values.get("line_reach", LINE_REACH))
        if line_reach < 1:
            raise ValueError(f"a line reach of {line_reach}: at least 1 lattice pixel")
        return cls(coefficients, int(values.get("reach", REACH)), prior_scale, line, line_reach,
                   bool(values.get("far", False)))


def fit_lattice_filter(network: torch.nn.Module, patches: torch.Tensor, noise: NoiseTerms | None,
                       cancel: threading.Event | None = None, line: str = "", far: bool = False) -> LatticeFilter:
    """Fit the filter to a fitted network's mean on noisy patches (B, C [+ context], H, W) (in
    their plane's orientation where there is a `line`, which their line offsets came out along)."""
    config = network.config
    device = next(network.parameters()).device
    network.eval()
    outputs = []
    with torch.no_grad():
        for chunk in patches.split(4):
            raise_if_cancelled(cancel, FitCancelled, "the lattice fit")
            outputs.append(network(chunk.to(device)).float())
    output = torch.cat(outputs)
    noisy = patches[:, : config.in_channels].float()
    if config.variance_head:
        mean, prior = split_output(output)
        weight = residual_weight(prior, noise.variance(mean) if noise is not None else None)
    else:
        mean, weight = output, 1.0
    weight = weight.cpu() if torch.is_tensor(weight) else weight
    lattice = LatticeFilter.fit(mean.cpu(), noisy, weight, line=line, far=far)
    if not config.variance_head or noise is None:
        return lattice
    refined = lattice.apply(mean.cpu(), noisy, weight, None)
    scale = prior_scale(refined, prior.cpu(), noisy, noise.variance(refined.to(device)).cpu())
    return dataclasses.replace(lattice, prior_scale=scale)


def prior_scale(mean: torch.Tensor, prior: torch.Tensor, noisy: torch.Tensor, noise_variance: torch.Tensor,
                border: int = FIT_BORDER) -> tuple[float, ...]:
    """Per channel, the factor s that makes s * prior the refined mean's error variance: the
    maximum of the Gaussian likelihood of the noisy patches, on a log grid. The prior-variance
    head was fitted to the network's own mean; the refined mean is better (D1, small, 300 s:
    s = 0.95; a tiny network fitted for 10 s: far less), and a prior that is too wide gives the
    noisy pixel too much weight."""
    inner = (slice(None), slice(None), slice(border, -border or None), slice(border, -border or None))
    squared = ((noisy - mean)[inner] ** 2).double()
    prior, noise_variance = prior[inner].double(), noise_variance[inner].double()
    grid = torch.exp(torch.linspace(math.log(0.02), math.log(4.0), 120, dtype=torch.float64))
    scales = []
    for channel in range(mean.shape[1]):
        total = grid.reshape(-1, 1) * prior[:, channel].reshape(1, -1) + noise_variance[:, channel].reshape(1, -1)
        nll = torch.mean(torch.log(total) + squared[:, channel].reshape(1, -1) / total, dim=1)
        scales.append(float(grid[torch.argmin(nll)]))
    return tuple(scales)
