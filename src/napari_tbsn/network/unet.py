"""The distilled student: a plain (not blind) fully convolutional UNet.

After the blind-spot teacher is fitted, the student learns to map the noisy input (with the
teacher's context planes) to the teacher's denoised output (TBSN2UNet). It sees every pixel,
its own included, and needs no posterior, ensemble or R3 at prediction: one cheap pass.

Its receptive field is bounded and stated (`radius`), so a tile needs only that margin
(`StudentConfig.margin`) beside the pixels it gives; tiles cut from the same padded image
as a whole-image pass on the same grid give the whole-image output, the image edges included.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .layers import channels_last


@dataclass(frozen=True)
class StudentConfig:
    """A UNet on the input's pixel-unshuffled sub-images (FFDNet's trick: every convolution runs
    at `shuffle`-fold lower resolution on shuffle**2 times the channels, which CPUs run far
    faster), `depth` poolings, `width` channels at the top level, growing by half of it per level."""

    width: int = 32
    depth: int = 4
    shuffle: int = 2
    in_channels: int = 1  # the data's channels, then the context planes (as the teacher's input)
    out_channels: int = 1

    def __post_init__(self) -> None:
        for name, low in (("width", 4), ("depth", 1), ("shuffle", 1), ("in_channels", 1), ("out_channels", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"student {name} must be a whole number of at least {low}, got {value!r}")
        if self.out_channels > self.in_channels:
            raise ValueError("the student predicts at most its input channels (it adds its output to them)")

    def level_width(self, level: int) -> int:
        return self.width + level * self.width // 2

    @property
    def size_multiple(self) -> int:
        return self.shuffle * 2**self.depth

    @property
    def radius(self) -> int:
        """Pixels on each side of an output pixel that can change it (an upper bound).

        Walking the layers at their scale s (input pixels per feature pixel): a 3x3 convolution
        reaches s further, a 2x2 max-pool or a nearest upsampling up to s, and the pixel
        (un)shuffles up to shuffle - 1 each."""
        scale = self.shuffle
        reach = 2 * (scale - 1) + scale  # the two shuffles, the input convolution
        for _ in range(self.depth):  # a convolution, a pool, the next level's convolution
            reach += scale + scale + 2 * scale
            scale *= 2
        reach += scale  # the bottleneck
        for _ in range(self.depth):  # upsample, two convolutions
            scale //= 2
            reach += scale + 2 * scale
        return reach + scale  # the output convolution

    @property
    def margin(self) -> int:
        """The overlap a tile needs on each inner side for its output to be exact: the radius,
        on the network's grid."""
        multiple = self.size_multiple
        return -(-self.radius // multiple) * multiple

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StudentConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown student settings {sorted(unknown)}")
        return cls(**{k: int(v) for k, v in values.items()})


# Measured on a 2-core CPU against the small teacher on a 1024x1024 plane: width 32, depth 4,
# shuffle 2 (0.77 M parameters) predicts 0.75 Mpx/s, 35x the teacher's 0.021 (benchmarks/distill.py
# for its quality). The paper preset (for GPUs) runs at full resolution, as the reference's UNet.
STUDENT_PRESETS: dict[str, StudentConfig] = {
    "tiny": StudentConfig(width=16, depth=3, shuffle=2),
    "small": StudentConfig(width=32, depth=4, shuffle=2),
    "paper": StudentConfig(width=48, depth=4, shuffle=1),
}


def student_preset(teacher_preset: str, in_channels: int, out_channels: int) -> StudentConfig:
    return dataclasses.replace(STUDENT_PRESETS[teacher_preset], in_channels=in_channels, out_channels=out_channels)


def reflect_index(length: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    """Indices of a side of `length` padded by mirror reflection (as numpy's "reflect"), for any
    padding however wide: the pattern repeats every 2 * (length - 1) pixels."""
    index = torch.arange(-before, length + after, device=device)
    if length == 1:
        return torch.zeros_like(index)
    period = 2 * (length - 1)
    index = torch.remainder(index, period)
    return torch.where(index >= length, period - index, index)


def _convolution(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1), nn.LeakyReLU(0.1))


class UNet(nn.Module):
    """(B, in_channels, H, W) noisy, normalised -> (B, out_channels, H, W) denoised, any H, W:
    the first out_channels of the input plus a learned correction (residual learning)."""

    def __init__(self, config: StudentConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.level_width(level) for level in range(config.depth + 1)]
        self.input = _convolution(config.in_channels * config.shuffle**2, widths[0])
        self.encoder = nn.ModuleList(_convolution(widths[level], widths[level]) for level in range(config.depth))
        self.down = nn.ModuleList(_convolution(widths[level], widths[level + 1]) for level in range(config.depth))
        self.bottleneck = _convolution(widths[-1], widths[-1])
        self.decoder = nn.ModuleList(
            nn.Sequential(_convolution(widths[level + 1] + widths[level], widths[level]),
                          _convolution(widths[level], widths[level]))
            for level in reversed(range(config.depth))
        )
        self.output = nn.Conv2d(widths[0], config.out_channels * config.shuffle**2, 3, padding=1)
        self.size_multiple = config.size_multiple
        self.shuffle = config.shuffle
        self.out_channels = config.out_channels
        # Weights and features channels last: oneDNN's convolutions run faster on that layout.
        self.to(memory_format=torch.channels_last)

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        """Reflect the borders (and up to the network's grid), run, crop back. Tiled prediction
        (`student_tiles`) cuts its tiles from this same padded image, so it gives this output."""
        height, width = noisy.shape[-2], noisy.shape[-1]
        (top, bottom), (left, right) = self.padding(height), self.padding(width)
        rows = reflect_index(height, top, bottom, noisy.device)
        columns = reflect_index(width, left, right, noisy.device)
        padded = noisy.index_select(-2, rows).index_select(-1, columns)
        return self.core(padded)[..., top : top + height, left : left + width]

    def padding(self, length: int) -> tuple[int, int]:
        """Reflected pixels before and after a side: a grid step of context at the image edge
        on each side, then up to the next multiple of the grid."""
        multiple = self.size_multiple
        return multiple, multiple + (multiple - length % multiple) % multiple

    def core(self, noisy: torch.Tensor) -> torch.Tensor:
        """The network on an input whose H and W are multiples of size_multiple; the outer
        `margin` pixels of its output depend on what lies beyond the input."""
        features = self.input(channels_last(F.pixel_unshuffle(noisy, self.shuffle)))
        skips = []
        for convolution, down in zip(self.encoder, self.down):
            features = convolution(features)
            skips.append(features)
            features = down(F.max_pool2d(features, 2))
        features = self.bottleneck(features)
        for level, block in enumerate(self.decoder):
            upsampled = F.interpolate(features, scale_factor=2.0, mode="nearest")
            features = block(torch.cat([upsampled, skips[len(skips) - 1 - level]], dim=1))
        correction = F.pixel_shuffle(self.output(features), self.shuffle)
        return (noisy[:, : self.out_channels] + correction).contiguous()


def parameter_count(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


class ZooUNet(UNet):
    """UNet built from plain numbers instead of a StudentConfig: the architecture of the
    bioimage.io export's pytorch_state_dict weights, whose constructor arguments must be plain
    YAML. The same modules, state dict and forward as UNet(StudentConfig(...))."""

    def __init__(self, width: int, depth: int, shuffle: int, in_channels: int, out_channels: int) -> None:
        super().__init__(StudentConfig(width=width, depth=depth, shuffle=shuffle,
                                       in_channels=in_channels, out_channels=out_channels))
