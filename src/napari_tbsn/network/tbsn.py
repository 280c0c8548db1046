"""TBSN: a parity-preserving 3-level U-Net of transformer blocks behind a masked input conv."""

from __future__ import annotations

import torch
from torch import nn

from ..config import NetworkConfig, network_preset
from .attention import MaskedWindowAttention, ParityChannelAttention
from .layers import (
    BiasFreeLayerNorm,
    CentreMaskedConv2d,
    FeedForward,
    ParityDownsample,
    ParityUpsample,
    PointwiseConv2d,
    channels_last,
    merge_parity,
    pointwise,
    split_parity,
)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: channel attention, FFN, spatial attention, FFN."""

    def __init__(
        self, dim: int, channel_heads: int, spatial_heads: int, config: NetworkConfig, scale: int
    ) -> None:
        super().__init__()
        self.norm_channel = BiasFreeLayerNorm(dim)
        self.channel_attention = ParityChannelAttention(dim, channel_heads, config.channel_block // scale)
        self.norm_ffn_1 = BiasFreeLayerNorm(dim)
        self.ffn_1 = FeedForward(dim, config.ffn_expansion)
        self.norm_spatial = BiasFreeLayerNorm(dim)
        self.spatial_attention = MaskedWindowAttention(
            dim, spatial_heads, config.spatial_head_dim, config.window, config.key_window
        )
        self.norm_ffn_2 = BiasFreeLayerNorm(dim)
        self.ffn_2 = FeedForward(dim, config.ffn_expansion)

    def forward(self, x: torch.Tensor, split: bool = True) -> torch.Tensor:
        x = x + self.channel_attention(self.norm_channel(x), split)
        x = x + self.ffn_1(self.norm_ffn_1(x), split)
        x = x + self.spatial_attention(self.norm_spatial(x), split)
        return x + self.ffn_2(self.norm_ffn_2(x), split)


class Stage(nn.ModuleList):
    """Consecutive transformer blocks at one resolution."""

    def __init__(
        self, count: int, dim: int, channel_heads: int, spatial_heads: int, config: NetworkConfig, scale: int
    ) -> None:
        super().__init__(TransformerBlock(dim, channel_heads, spatial_heads, config, scale) for _ in range(count))

    def forward(self, x: torch.Tensor, split: bool = True) -> torch.Tensor:
        for block in self:
            x = block(x, split)
        return x


class TBSN(nn.Module):
    """Transformer-Based Blind-Spot Network (arXiv 2404.07846), exactly blind.

    Maps (B, C_in + C_context, H, W) to (B, C_out, H, W), or with `variance_head` to
    (B, 2 C_out, H, W): the means, then the log prior variances. The C_context channels (the
    neighbouring planes of a stack) are seen whole; of the C_in blind channels, output pixel p
    never sees any pixel at p + 2Z^2 (p itself included): the masked input conv removes the offsets with
    both components even, and every later layer keeps parity classes apart. H and W must
    divide by `size_multiple`.

    With `channels_as_samples`, the layers are those of a single-channel network, and each of
    the C channels (with its own context planes) runs through them as a sample of its own.
    """

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        dim = config.dim
        ch, sp = config.channel_heads, config.spatial_heads
        groups = config.groups
        self.input_conv = CentreMaskedConv2d(config.in_channels // groups, dim)
        # Neighbouring planes carry none of this plane's noise: an ordinary conv sees them whole.
        self.context_conv = (
            nn.Conv2d(config.context_channels // groups, dim, 3, padding=1, bias=False) if config.context_channels
            else None
        )
        self.encoder_1 = Stage(config.encoder_blocks[0], dim, ch[0], sp[0], config, 1)
        self.down_1 = ParityDownsample(dim)
        self.encoder_2 = Stage(config.encoder_blocks[1], 2 * dim, ch[1], sp[1], config, 2)
        self.down_2 = ParityDownsample(2 * dim)
        self.latent = Stage(config.encoder_blocks[2], 4 * dim, ch[2], sp[2], config, 4)
        self.up_2 = ParityUpsample(4 * dim)
        self.reduce_2 = PointwiseConv2d(4 * dim, 2 * dim)
        self.decoder_2 = Stage(config.decoder_blocks[0], 2 * dim, ch[1], sp[1], config, 2)
        self.up_1 = ParityUpsample(2 * dim)
        self.decoder_1 = Stage(config.decoder_blocks[1], 2 * dim, ch[0], sp[0], config, 1)
        self.refinement = Stage(config.refinement_blocks, 2 * dim, ch[0], sp[0], config, 1)
        heads = 2 if config.variance_head else 1
        self.output_conv = PointwiseConv2d(2 * dim, heads * self.mean_outputs, bias=True)

    @property
    def mean_outputs(self) -> int:
        """The output conv's mean rows (its variance rows follow): one per channel, or one for
        all when the channels run as samples."""
        return self.config.out_channels // self.config.groups

    @classmethod
    def from_preset(cls, name: str, channels: int = 1, out_channels: int | None = None) -> "TBSN":
        return cls(network_preset(name, channels, out_channels))

    @property
    def size_multiple(self) -> int:
        return self.config.size_multiple

    def forward(self, x: torch.Tensor, layout: str = "split") -> torch.Tensor:
        """`layout="full"` runs the paper's full-resolution formulation (dilated convs, masked
        window attention); the default "split" runs each parity class as its own image: the
        same function with the same weights, and faster."""
        height, width = x.shape[-2:]
        multiple = self.size_multiple
        if height % multiple or width % multiple:
            raise ValueError(f"TBSN needs H and W divisible by {multiple}, got {height}x{width}")
        if layout not in ("split", "full"):
            raise ValueError(f"layout must be 'split' or 'full', got {layout!r}")
        return self.head(self.features(x, layout), per_sample=self.is_per_sample(x))

    def is_per_sample(self, x: torch.Tensor) -> bool:
        """Whether `x` holds single channels already (with their context planes): how a network
        whose channels run as samples is trained, one channel of a plane per sample."""
        config = self.config
        return config.groups > 1 and x.shape[1] == (config.in_channels + config.context_channels) // config.groups

    def blind_inputs(self, x: torch.Tensor) -> int:
        """The blind channels at the front of `x` (the rest are context planes)."""
        return self.config.in_channels // (self.config.groups if self.is_per_sample(x) else 1)

    def features(self, x: torch.Tensor, layout: str = "split") -> torch.Tensor:
        """The decoded full-resolution features that the 1x1 output conv reads (one sample per
        channel when the channels run as samples: output() puts them back)."""
        split = layout == "split"
        blind = self.config.in_channels
        if x.shape[1] != blind + self.config.context_channels and not self.is_per_sample(x):
            raise ValueError(
                f"TBSN expects {blind} channel(s) + {self.config.context_channels} context channel(s), got {x.shape[1]}"
            )
        x = x if self.is_per_sample(x) else self._as_samples(x)
        blind //= self.config.groups
        features = self.input_conv(x[:, :blind])
        if self.context_conv is not None:
            features = features + self.context_conv(x[:, blind:])
        features = channels_last(features)  # the layout every later layer keeps (layers.py)
        if split:
            features = split_parity(features)
        decoded = self._body(features, split)
        return merge_parity(decoded) if split else decoded

    def head(self, features: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
        """The 1x1 output conv; the variance head reads the features detached."""
        weight, bias = self.output_conv.weight, self.output_conv.bias
        if not self.config.variance_head:
            return self.output(features, weight, bias, per_sample)
        means = self.mean_outputs
        mean = self.output(features, weight[:means], bias[:means], per_sample)
        log_variance = self.output(features.detach(), weight[means:], bias[means:], per_sample)
        return torch.cat([mean, log_variance], dim=1)

    def output(self, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               per_sample: bool = False) -> torch.Tensor:
        """A 1x1 conv of the features (as features() gives them) with rows of the output conv's
        shape: (B, rows * C, H, W) per channel when the channels run as samples (unless the input
        was `per_sample` already), else (B, rows, H, W)."""
        output = pointwise(features, weight, bias).contiguous()
        groups = self.config.groups
        if groups == 1 or per_sample:
            return output
        samples, rows, height, width = output.shape
        return output.reshape(samples // groups, groups, rows, height, width).transpose(1, 2) \
            .reshape(samples // groups, rows * groups, height, width)

    def _as_samples(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P * C, H, W), P planes of C channels -> (B * C, P, H, W), each channel's planes a
        sample of its own, when the channels run as samples."""
        groups = self.config.groups
        if groups == 1:
            return x
        batch, depth, height, width = x.shape
        planes = depth // groups
        return x.reshape(batch, planes, groups, height, width).transpose(1, 2).reshape(batch * groups, planes,
                                                                                       height, width)

    def _body(self, x: torch.Tensor, split: bool) -> torch.Tensor:
        level_1 = self.encoder_1(x, split)
        level_2 = self.encoder_2(self.down_1(level_1, split), split)
        latent = self.latent(self.down_2(level_2, split), split)
        decoded_2 = self.reduce_2(torch.cat([self.up_2(latent, split), level_2], dim=1))
        decoded_2 = self.decoder_2(decoded_2, split)
        decoded_1 = torch.cat([self.up_1(decoded_2, split), level_1], dim=1)
        return self.refinement(self.decoder_1(decoded_1, split), split)
