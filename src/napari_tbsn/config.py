"""Typed configuration: the network architecture and the fitting recipe.

Both are plain frozen dataclasses, saved as JSON beside the weights, so a model file
always says how to rebuild the network that produced it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any


def _check_whole(name: str, value: Any, minimum: int) -> int:
    """`value` as an int (numpy integers included), or a ValueError that says what is wanted."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be a whole number of at least {minimum}, got {value!r}")
    return int(value)


def _check_number(name: str, value: Any, low: float, high: float | None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < low or (high is not None and value > high):
        where = f"from {low:g} to {high:g}" if high is not None else f"of at least {low:g}"
        raise ValueError(f"{name} must be a finite number {where}, got {value!r}")



@dataclass(frozen=True)
class NetworkConfig:
    """Architecture of a TBSN (a 3-level parity-preserving U-Net of transformer blocks)."""

    dim: int = 48
    encoder_blocks: tuple[int, int, int] = (4, 4, 4)
    decoder_blocks: tuple[int, int] = (4, 4)
    refinement_blocks: int = 4
    channel_heads: tuple[int, int, int] = (1, 2, 4)
    spatial_heads: tuple[int, int, int] = (2, 2, 3)
    window: int = 8
    overlap: float = 0.5
    spatial_head_dim: int = 16
    ffn_expansion: float = 1.0
    # Channel attention statistics over blocks of this many full-resolution pixels (0: the
    # whole image, as in the paper). Local statistics make the output independent of how
    # far the image extends, so tiled prediction equals whole-image prediction, and match
    # what the network saw on its training patches.
    channel_block: int = 64
    in_channels: int = 1
    out_channels: int = 1
    # Also predict a log prior variance per output channel (the Bayesian posterior's prior),
    # from features detached from the graph, so that it cannot pull the trunk off the mean.
    variance_head: bool = False
    # Extra input channels seen whole, after the in_channels of the blind plane: the
    # neighbouring planes of a Z-stack or time series (independent noise, same structures).
    context_channels: int = 0
    # The channels as samples of one single-channel network (independent stains): each channel,
    # with its own context planes, runs through the same weights on its own.
    channels_as_samples: bool = False

    def __post_init__(self) -> None:
        # JSON gives lists back; keep tuples so configs compare and hash.
        for name in ("encoder_blocks", "decoder_blocks", "channel_heads", "spatial_heads"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        self.validate()

    @property
    def context_planes(self) -> int:
        """Neighbouring planes on each side behind the context channels."""
        return self.context_channels // (2 * self.in_channels)

    @property
    def groups(self) -> int:
        """How many independent samples each input is split into (its channels, or 1)."""
        return self.in_channels if self.channels_as_samples else 1

    @property
    def key_window(self) -> int:
        return self.window + round(self.window * self.overlap)

    @property
    def size_multiple(self) -> int:
        """H and W must divide by this: two parity downsamplings, whole windows, whole blocks."""
        return math.lcm(4 * self.window, self.channel_block or 1)

    def validate(self) -> None:
        if self.dim % 2:
            raise ValueError(f"dim must be even (parity downsampling halves it), got {self.dim}")
        extra = self.window * self.overlap
        if abs(extra - round(extra)) > 1e-9:
            raise ValueError(
                f"window {self.window} with overlap {self.overlap} gives a key window of "
                f"{self.window + extra} pixels; choose an overlap that makes it a whole number"
            )
        padding_per_side = round(extra) / 2
        if padding_per_side % 2:
            raise ValueError(
                f"window {self.window} with overlap {self.overlap} pads the key window by "
                f"{padding_per_side:g} pixels per side; the M-WSA dilation mask needs an even "
                "padding, or the lattice it keeps shifts to odd offsets and the blind spot "
                "leaks. Use e.g. window 8 with overlap 0.5, or window 4 with overlap 1.0"
            )
        if self.channels_as_samples and (self.out_channels != self.in_channels
                                         or self.context_channels % self.in_channels):
            raise ValueError("channels as samples needs as many outputs as inputs, and context planes of every "
                             f"channel; got {self.in_channels} in, {self.out_channels} out, "
                             f"{self.context_channels} context")
        if self.channel_block and self.channel_block % 16:
            raise ValueError(f"channel_block must be a multiple of 16 pixels (or 0), got {self.channel_block}")
        dims = (self.dim, 2 * self.dim, 4 * self.dim)
        for level, (heads, channels) in enumerate(zip(self.channel_heads, dims)):
            if channels % heads:
                raise ValueError(f"level {level}: {channels} channels do not split into {heads} heads")
        if 2 * self.dim % self.channel_heads[0]:
            raise ValueError("the decoder's first level needs 2*dim divisible by channel_heads[0]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "NetworkConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown network settings {sorted(unknown)}")
        return cls(**values)


NETWORK_PRESETS: dict[str, NetworkConfig] = {
    # The paper's network: 12.7 M trainable parameters, ~650 GFLOP per 256x256 forward.
    "paper": NetworkConfig(),
    # CPU-friendly: the same architecture, narrower and one block per stage.
    "small": NetworkConfig(
        dim=24,
        encoder_blocks=(1, 1, 1),
        decoder_blocks=(1, 1),
        refinement_blocks=1,
        channel_heads=(1, 2, 4),
        spatial_heads=(1, 2, 2),
        window=8,
        overlap=0.5,
        spatial_head_dim=12,
    ),
    # For tests and quick looks: seconds on a CPU.
    "tiny": NetworkConfig(
        dim=8,
        encoder_blocks=(1, 1, 1),
        decoder_blocks=(1, 1),
        refinement_blocks=0,
        channel_heads=(1, 2, 2),
        spatial_heads=(1, 1, 1),
        window=4,
        overlap=1.0,
        spatial_head_dim=8,
    ),
}

PRESET_HINTS: dict[str, str] = {
    "tiny": "tiny: seconds on a CPU, for a quick look",
    "small": "small: the CPU default, minutes",
    "paper": "paper: 12.7 M parameters, wants a GPU",
}


def network_preset(
    name: str,
    channels: int = 1,
    out_channels: int | None = None,
    variance_head: bool = False,
    context_channels: int = 0,
    channels_as_samples: bool = False,
) -> NetworkConfig:
    """The named preset for `channels` input channels (and as many outputs by default)."""
    if name not in NETWORK_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(NETWORK_PRESETS)}")
    if channels < 1:
        raise ValueError(f"channels must be at least 1, got {channels}")
    return dataclasses.replace(
        NETWORK_PRESETS[name],
        in_channels=channels,
        out_channels=channels if out_channels is None else out_channels,
        variance_head=variance_head,
        context_channels=context_channels,
        channels_as_samples=channels_as_samples and channels > 1,
    )


@dataclass(frozen=True)
class FitConfig:
    """How a Denoiser fits its network to the user's noisy data."""

    patch_size: int = 64
    batch_size: int = 4
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.02
    validation_fraction: float = 0.1  # of the patch-sized blocks, where no pixels are held out
    validation_patches_max: int = 16  # validation crops
    # The share of the pixels held out of the blind-spot loss for validation (training.Trainer);
    # 0 holds out whole blocks instead (validation_fraction), as distillation does.
    validation_pixels: float = 0.03
    validation_every: int = 25  # at most this often (training.validation_interval)
    ema_decay: float = 0.99  # weight averaging; 0 turns it off
    mixed_precision: bool = True  # bfloat16 autocast where the device has fast bf16 (CUDA, AMX CPUs)
    default_iterations: int = 2000
    max_training_pixels: int = 2**26
    compile: str = "auto"  # "auto" (CUDA, fits of COMPILE_MIN_SECONDS or more), "always" or "never"
    # The fit ends once its crops have covered the training pixels this many times (0: no limit),
    # however much time is left: a backstop behind the held-out pixels' plateau (training.pass_horizon).
    max_passes: float = 1000.0

    def __post_init__(self) -> None:
        for name in ("patch_size", "batch_size", "validation_patches_max", "validation_every", "default_iterations",
                     "max_training_pixels"):
            object.__setattr__(self, name, _check_whole(name, getattr(self, name), minimum=1))
        for name, low, high in (("learning_rate", 0.0, None), ("weight_decay", 0.0, None), ("warmup_fraction", 0.0, 1.0),
                                ("min_lr_fraction", 0.0, 1.0), ("validation_fraction", 0.0, 1.0), ("ema_decay", 0.0, 1.0),
                                ("validation_pixels", 0.0, 0.5),
                                ("max_passes", 0.0, None)):
            _check_number(name, getattr(self, name), low, high)
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.compile not in ("auto", "always", "never"):
            raise ValueError(f"compile must be 'auto', 'always' or 'never', got {self.compile!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FitConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


FIT_PRESETS: dict[str, FitConfig] = {
    "tiny": FitConfig(patch_size=64, batch_size=4, learning_rate=3e-3, default_iterations=300),
    # Measured on D1 (2-core CPU, 300 s): one 128-pixel patch per step beat 4x64 and 2x128.
    "small": FitConfig(patch_size=128, batch_size=1, learning_rate=3e-3, default_iterations=2000),
    "paper": FitConfig(patch_size=128, batch_size=4, learning_rate=3e-4, default_iterations=20000),
}


ESTIMATORS = ("posterior", "blind_spot")
ENSEMBLES = (1, 8, "auto")
# R3 (AP-BSN) rounds for correlated noise (pd > 1) unless asked for: none. Measured on D4 (pd 3, three
# fits of 386 iterations, docs/measurements.md): R3's full-resolution passes, a network fitted on pd-3
# sub-images run on a mostly denoised full-resolution image, shifted the output's level by -0.35 to
# -0.56 (26.41-27.54 dB), where the x8 self-ensemble of the first pass, about the same number of
# passes, gave 28.17-28.41 and no shift.
R3_ROUNDS = 0
MIN_TILE_SIZE = 64  # the tiling floor an out-of-memory retry halves down to


@dataclass(frozen=True)
class PredictOptions:
    """How one prediction runs: checked here, passed per call, never stored into the model.

    `estimator`: "posterior" (noise model + blind spot, pixel-independent noise) or
    "blind_spot" (the plain blind-spot mean). `ensemble`: 8 averages over flips and 90-degree
    rotations, 1 does not, "auto" takes 8 for small pixel-independent inputs and for correlated
    noise (pd > 1) without R3. `refine`: R3 rounds for correlated noise (pd > 1; 0, the default,
    for none). `lattice`: apply the fitted lattice filter (pixel-independent noise). Tiles of
    `tile_size` pixels ("auto": as large as a quarter of the free memory allows) overlap by
    `tile_overlap` and run `batch_size` at a time. `student`: predict with the distilled student
    (one fast pass; the teacher's estimator, ensemble, R3 and lattice settings are then built
    into it): True wherever the model has one, "auto" unless its check on held-out pixels found
    it worse than the teacher, False never."""

    estimator: str = "posterior"
    ensemble: int | str = "auto"
    refine: int = R3_ROUNDS
    lattice: bool = True
    tile_size: int | str = "auto"
    tile_overlap: int = 256
    batch_size: int = 4
    student: bool | str = "auto"

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if isinstance(self.ensemble, bool) or self.ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble must be 1 (off), 8 (flips and rotations) or 'auto', got {self.ensemble!r}")
        if self.ensemble != "auto":
            object.__setattr__(self, "ensemble", int(self.ensemble))
        if not isinstance(self.lattice, bool):
            raise ValueError(f"lattice must be True or False, got {self.lattice!r}")
        if not (isinstance(self.student, bool) or self.student == "auto"):
            raise ValueError(f"student must be True, False or 'auto', got {self.student!r}")
        if self.tile_size != "auto":
            object.__setattr__(self, "tile_size", _check_whole("tile_size ('auto' or pixels)", self.tile_size,
                                                              MIN_TILE_SIZE))
        for name, minimum in (("refine", 0), ("tile_overlap", 0), ("batch_size", 1)):
            object.__setattr__(self, name, _check_whole(name, getattr(self, name), minimum))

    def replace(self, **changes: Any) -> "PredictOptions":
        """A copy with `changes` (None values ignored), checked again."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PredictOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def student_option(choice: str, uncertainty: bool = False) -> bool | str:
    """PredictOptions.student for a front end's choice "auto", "on" or "off" (never the student
    where an uncertainty map is asked for: only the teacher gives one)."""
    if choice not in STUDENT_CHOICES:
        raise ValueError(f"student must be one of {STUDENT_CHOICES}, got {choice!r}")
    return False if uncertainty else {"auto": "auto", "on": True, "off": False}[choice]


STUDENT_CHOICES = ("auto", "on", "off")


def describe_plateau(iteration: int) -> str:
    """What the user is told once validation has stopped improving."""
    return f"validation stopped improving at iteration {iteration}"


@dataclass
class TrainingSummary:
    """What a fit did, saved with the model."""

    iterations: int = 0
    seconds: float = 0.0
    best_iteration: int = 0
    best_validation_loss: float | None = None
    stopped_early: bool = False
    variance_head_loss: float | None = None  # the posterior's prior-variance fit (NLL)
    history: list[dict[str, float]] = field(default_factory=list)
    processes: int = 1  # DDP ranks that fitted together
    channels: str | None = None  # how a multichannel image was fitted, and why
    plateau_iteration: int | None = None  # where validation stopped improving, when well before the end
    pass_limit: int | None = None  # the iterations the data's size allowed, where they bound the fit
    camera: str | None = None  # what camera effects were found and taken out
    compile_seconds: float = 0.0  # torch.compile's time before the fit, outside `seconds` and the budget
    images: int = 1  # how many images (files, layers) were fitted together
    runaways: int = 0  # steps that threw validation off, undone (back to the kept weights, half the rate)

    def headline(self) -> str:
        """What a user needs first: how long the fit took, and whether more time would help."""
        from .progress import format_seconds

        on = f" on {self.images} images" if self.images > 1 else ""
        done = f"fitted{on} in {format_seconds(self.seconds)} ({self.iterations} iterations)"
        if self.best_iteration > 0:
            done += f"; best at iteration {self.best_iteration} of {self.iterations}"
        if self.plateau_iteration is not None:
            return f"{done}: more time would not help"
        if self.pass_limit is not None and self.iterations >= self.pass_limit:
            return f"{done}; it covered the image many times over: more time would only fit the noise"
        if self.stopped_early:
            return f"{done}; stopped early: more time may still help"
        return f"{done}; still improving at the end: more time would likely help"

    def describe(self) -> str:
        """One line for the CLI and the widget."""
        from .progress import format_seconds

        best = "no validation loss" if self.best_validation_loss is None else \
            f"best validation loss {self.best_validation_loss:.6g} at iteration {self.best_iteration} of {self.iterations}"
        stopped = " (stopped early)" if self.stopped_early else ""
        plateau = "" if self.plateau_iteration is None else \
            f"; {describe_plateau(self.plateau_iteration)}: more fitting time would not help"
        limit = "" if self.pass_limit is None or self.iterations < self.pass_limit else \
            "; the fit ended where its crops had covered the image's pixels many times over: more time would fit " \
            "the noise"
        channels = f"; {self.channels}" if self.channels else ""
        camera = f"; camera: {self.camera}" if self.camera else ""
        compiled = f" (after {format_seconds(self.compile_seconds)} compiling the network)" if self.compile_seconds else ""
        on = f" on {self.images} images" if self.images > 1 else ""
        runaways = f"; {self.runaways} unstable step(s) undone at a lower learning rate" if self.runaways else ""
        return (f"{self.iterations} iterations{on} in {format_seconds(self.seconds)}{compiled}{stopped}, {best}{plateau}"
                f"{limit}{runaways}{channels}{camera}")
