"""A fitted model: everything a prediction needs, frozen.

Fitting builds a new FittedModel and never changes an old one (it trains a copy of the
network), so a fit that fails or is stopped leaves the model the user had exactly as it was.
`model_io` writes and reads it: weights in safetensors, the rest as JSON in its header.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .config import MIN_TILE_SIZE, FitConfig, NetworkConfig, PredictOptions, TrainingSummary
from .lattice import LatticeFilter
from .model_io import ModelFileError, load_model, save_model
from .network import TBSN
from .noise import NoiseCorrelation, NoiseMeasurement, NoiseModel
from .normalization import Normalizer
from .posterior import NoiseTerms
from .student import Student

STUDENT_PREFIX = "student."
SAMPLE_KEY = "sample.student_input"


@dataclass(frozen=True, eq=False)
class FittedModel:
    """A fitted TBSN and what it was fitted with. Nothing here is changed after a fit: the
    network is only ever run in eval mode, and a fine-tune trains a copy."""

    network: TBSN
    normalizer: Normalizer
    pd: int
    preset: str
    axes: str | None = None
    noise_model: NoiseModel | None = None
    noise_measurement: NoiseMeasurement | None = None  # the measured points the noise model rests on
    noise_correlation: NoiseCorrelation | None = None
    lattice_filter: LatticeFilter | None = None
    summary: TrainingSummary | None = None
    # False when a fit stopped before the prior-variance head was fitted: the model then gives
    # the plain blind-spot mean until a fine-tune completes it.
    variance_head_fitted: bool = True
    seed: int = 0
    fit_config: FitConfig = dataclasses.field(default_factory=FitConfig)
    student: Student | None = None  # the distilled UNet (Denoiser.distil), or None
    # How the camera was handled ({"mode": "auto" | "off" | "dark frames", "found": [...]});
    # older models took the data as it came ("off").
    camera: dict = dataclasses.field(default_factory=lambda: {"mode": "off", "found": []})
    # What it was fitted on: one {"name", "shape", "axes"} per image (older models: empty).
    fitted_on: tuple[dict, ...] = ()

    @property
    def config(self) -> NetworkConfig:
        return self.network.config

    @property
    def channels(self) -> int:
        return self.network.config.in_channels

    @property
    def channel_mode(self) -> str:
        """How its channels were fitted: "single" (one channel), "joint" or "independent"."""
        return "independent" if self.config.channels_as_samples else "joint" if self.channels > 1 else "single"

    @property
    def context_planes(self) -> int:
        """Neighbouring planes on each side that the network reads."""
        return self.network.config.context_planes

    @property
    def predicts_posterior(self) -> bool:
        """Whether the model can give the posterior: a fitted prior-variance head and a noise model."""
        return self.config.variance_head and self.variance_head_fitted and self.noise_model is not None

    @property
    def predict_pd(self) -> int:
        """Pixel-shuffle factor at inference: a smaller one than for training (AP-BSN)."""
        return min(self.pd, 2)

    def noise_terms(self, device: torch.device) -> NoiseTerms:
        """The noise model in the network's normalised units (it needs one)."""
        low, scale = np.asarray(self.normalizer.low), self.normalizer.scale
        return NoiseTerms.of(*self.noise_model.normalized(low, scale), device)

    @property
    def minimum_size(self) -> int:
        """The smallest H and W that prediction accepts."""
        return self.network.size_multiple * self.predict_pd

    def describe(self, defaults: PredictOptions) -> dict[str, Any]:
        """Everything saved beside the weights, with the prediction defaults of the Denoiser."""
        return {
            "preset": self.preset,
            "network": self.config.to_dict(),
            "channels": self.channels,
            "normalization": self.normalizer.to_dict(),
            "axes": self.axes,
            "pd": self.pd,
            "estimator": defaults.estimator,
            "refine": defaults.refine,
            "variance_head_fitted": self.variance_head_fitted,
            "lattice_filter": self.lattice_filter.to_dict() if self.lattice_filter else None,
            "noise_model": self.noise_model.to_dict() if self.noise_model else None,
            "noise_measurement": self.noise_measurement.to_dict() if self.noise_measurement else None,
            "noise_correlation": self.noise_correlation.to_dict() if self.noise_correlation else None,
            "seed": self.seed,
            "fit": self.fit_config.to_dict(),
            "tiling": {"tile_size": defaults.tile_size, "tile_overlap": defaults.tile_overlap,
                       "ensemble": defaults.ensemble},
            "training": dataclasses.asdict(self.summary) if self.summary else None,
            "student": self.student.describe() if self.student else None,
            "camera": self.camera,
            "fitted_on": list(self.fitted_on),
            "package_version": __version__,
        }

    def save(self, path: str | Path, defaults: PredictOptions) -> Path:
        """Weights (safetensors; the student's under "student.") and description (JSON header),
        written atomically."""
        state = dict(self.network.state_dict())
        if self.student is not None:
            state.update({STUDENT_PREFIX + name: tensor for name, tensor in self.student.network.state_dict().items()})
            if self.student.sample is not None:
                state[SAMPLE_KEY] = torch.tensor(self.student.sample)
        return save_model(path, state, self.describe(defaults))

    @classmethod
    def load(cls, path: str | Path) -> tuple[FittedModel, PredictOptions]:
        """The model in `path` and the prediction defaults saved with it."""
        state, description = load_model(path)
        sample = state.pop(SAMPLE_KEY, None)
        student_state = {name[len(STUDENT_PREFIX):]: tensor for name, tensor in state.items()
                         if name.startswith(STUDENT_PREFIX)}
        state = {name: tensor for name, tensor in state.items() if not name.startswith(STUDENT_PREFIX)}
        try:
            network = TBSN(NetworkConfig.from_dict(description["network"]))
            network.load_state_dict(state, strict=True)
            tiling = description.get("tiling", {})
            defaults = PredictOptions(
                estimator=description.get("estimator", "blind_spot"),
                refine=int(description.get("refine", PredictOptions.refine)),
                tile_size=_saved_tile(tiling.get("tile_size", PredictOptions.tile_size)),
                tile_overlap=max(int(tiling.get("tile_overlap", PredictOptions.tile_overlap)), 0),
                ensemble=tiling.get("ensemble", PredictOptions.ensemble),
            )
            model = cls(
                network=network.eval(),
                normalizer=Normalizer.from_dict(description["normalization"]),
                pd=int(description.get("pd", 1)),
                preset=str(description.get("preset", "small")),
                axes=description.get("axes"),
                noise_model=_optional(NoiseModel.from_dict, description, "noise_model"),
                noise_measurement=_optional(NoiseMeasurement.from_dict, description, "noise_measurement"),
                noise_correlation=_optional(NoiseCorrelation.from_dict, description, "noise_correlation"),
                lattice_filter=_optional(LatticeFilter.from_dict, description, "lattice_filter"),
                summary=_optional(lambda t: TrainingSummary(**t), description, "training"),
                variance_head_fitted=bool(description.get("variance_head_fitted", True)),
                seed=int(description.get("seed", 0)),
                fit_config=FitConfig.from_dict(description.get("fit", {})),
                student=_optional(lambda d: Student.from_description(d, student_state, sample), description, "student"),
                camera=dict(description.get("camera") or {"mode": "off", "found": []}),
                fitted_on=tuple(_fitted_on(description.get("fitted_on") or [])),
            )
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:
            raise ModelFileError(f"{path} does not describe a usable TBSN model ({error}); save the model again") \
                from error
        return model, defaults


def _fitted_on(images: list) -> list[dict]:
    """The saved record of the images a model was fitted on, checked."""
    return [{"name": None if image.get("name") is None else str(image["name"]),
             "shape": [int(v) for v in image["shape"]], "axes": str(image["axes"])} for image in images]


def _saved_tile(value) -> int | str:
    """A saved tile size: "auto", or pixels (older versions took tiles below today's floor:
    predict those with the floor)."""
    return value if value == "auto" else max(int(value), MIN_TILE_SIZE)


def _optional(read, description: dict, key: str):
    """description[key] read by `read`, or None where absent (older files)."""
    value = description.get(key)
    try:
        return read(value) if value else None
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"an unreadable {key.replace('_', ' ')}: {error}") from error
