"""The facade: one object that fits, predicts, saves and loads. The widget, the CLI, the
benchmarks and the tests all go through it.

Pipeline: axes -> normalise -> sample patches -> fit -> tiled predict -> denormalise.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .axes import PlaneLayout, guess_axes
from .config import FIT_PRESETS, NETWORK_PRESETS, FitConfig, NetworkConfig, TrainingSummary, network_preset
from .devices import out_of_memory_error, resolve_device
from .image_io import release_pages
from .model_io import ModelFileError, load_model, save_model
from .network import TBSN
from .noise import pd_down, pd_up
from .normalization import Normalizer
from .progress import drive
from .patches import PatchSampler, check_finite, fitting_patch_size, load_training_planes
from .tiling import TiledPredictor, round_up
from .training import FitProgress, Trainer

__all__ = ["Denoiser", "FitProgress", "PredictProgress", "PredictionCancelled"]

MAX_PD = 8


class PredictionCancelled(RuntimeError):
    """Raised by predict when cancel() stopped it; planes already written stay written."""


@dataclass(frozen=True)
class PredictProgress:
    plane: int
    planes: int
    tile: int
    tiles: int
    elapsed: float
    eta: float | None
    fraction: float


def check_data(data) -> None:
    """Reject what cannot be denoised, where it enters, with the fix in the message."""
    if not hasattr(data, "shape") or not hasattr(data, "dtype"):
        raise TypeError(f"expected an array (numpy, dask, zarr, memmap), got {type(data).__name__}")
    dtype = np.dtype(data.dtype)
    if dtype == np.bool_ or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise TypeError(
            f"cannot denoise data of dtype {dtype}; convert it to a real-valued type first, "
            "e.g. data.astype(numpy.float32)"
        )
    if len(data.shape) < 2:
        raise ValueError(f"expected at least a 2D image, got shape {tuple(data.shape)}")


class Denoiser:
    """Self-supervised TBSN denoiser for N-D microscopy stacks.

    >>> denoiser = Denoiser(preset="small").fit(stack, axes="ZYX", time_budget=300)
    >>> clean = denoiser.predict(stack, axes="ZYX")
    """

    def __init__(
        self,
        preset: str = "small",
        pd: int = 1,
        device: str | torch.device = "auto",
        seed: int = 0,
        *,
        fit_config: FitConfig | None = None,
        tile_size: int = 768,
        tile_overlap: int = 256,
        predict_batch_size: int = 4,
        ensemble: int = 1,
    ) -> None:
        if preset not in NETWORK_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(NETWORK_PRESETS)}")
        if not isinstance(pd, int) or not 1 <= pd <= MAX_PD:
            raise ValueError(f"pd must be an integer from 1 to {MAX_PD} (1 for pixel-independent noise), got {pd!r}")
        self.preset = preset
        self.pd = pd
        self.device = resolve_device(device)
        self.seed = seed
        self.fit_config = fit_config or FIT_PRESETS[preset]
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.predict_batch_size = predict_batch_size
        if ensemble not in (1, 8):
            raise ValueError(f"ensemble must be 1 (off) or 8 (flips and rotations), got {ensemble}")
        self.ensemble = ensemble
        self.network: TBSN | None = None
        self.normalizer: Normalizer | None = None
        self.axes: str | None = None
        self.summary: TrainingSummary | None = None
        self._cancel = threading.Event()
        self._trainer: Trainer | None = None

    # -- state -------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return self.network is not None and self.normalizer is not None

    @property
    def network_config(self) -> NetworkConfig | None:
        return None if self.network is None else self.network.config

    @property
    def predict_pd(self) -> int:
        """Pixel-shuffle factor at inference: a smaller one than for training (AP-BSN)."""
        return min(self.pd, 2)

    def cancel(self) -> None:
        """Stop a running fit (within one iteration, keeping the best weights) or predict."""
        self._cancel.set()
        if self._trainer is not None:
            self._trainer.cancel()

    # -- fitting -----------------------------------------------------------------------
    def fit(
        self,
        data,
        axes: str,
        iterations: int | None = None,
        time_budget: float | None = None,
        callback: Callable[[FitProgress], None] | None = None,
    ) -> "Denoiser":
        """Fit (or fine-tune, after load) the network to the noisy `data` itself."""
        return drive(self.fit_iter(data, axes, iterations, time_budget), callback)

    def fit_iter(
        self,
        data,
        axes: str,
        iterations: int | None = None,
        time_budget: float | None = None,
    ) -> Generator[FitProgress, None, "Denoiser"]:
        """fit() as a generator that yields progress after every iteration (for GUIs)."""
        check_data(data)
        layout = PlaneLayout.of(data.shape, axes)
        if iterations is not None and iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {iterations}")
        if time_budget is not None and time_budget <= 0:
            raise ValueError(f"time_budget must be positive seconds, got {time_budget}")
        if self.network is not None and self.network.config.in_channels != layout.channels:
            raise ValueError(
                f"this model has {self.network.config.in_channels} channel(s) but the data has "
                f"{layout.channels}; fit a new Denoiser for this data"
            )
        self._cancel.clear()
        normalizer = Normalizer.from_data(data, layout)
        network = self.network
        if network is None:
            torch.manual_seed(self.seed)
            network = TBSN(network_preset(self.preset, layout.channels))
        network.to(self.device)
        granularity = network.size_multiple * self.pd
        patch = fitting_patch_size(
            max(self.fit_config.patch_size, granularity), layout.height, layout.width, granularity
        )
        planes = load_training_planes(data, layout, normalizer, self.fit_config.max_training_pixels)
        rng = np.random.default_rng(self.seed)
        sampler = PatchSampler(
            planes, patch, self.fit_config.validation_fraction, self.fit_config.validation_patches_max, rng
        )
        self._trainer = Trainer(network, sampler, self.fit_config, self.device, self.pd, self.seed)
        if self._cancel.is_set():  # cancel() arrived while the data loaded
            self._trainer.cancel()
        try:
            self.summary = yield from self._trainer.run(iterations, time_budget)
        except torch.OutOfMemoryError as error:
            raise out_of_memory_error(self.device, "fitting") from error
        finally:
            self._trainer = None
        self.network = network
        self.normalizer = normalizer
        self.axes = layout.axes
        return self

    # -- prediction --------------------------------------------------------------------
    def _run_network(self, batch: torch.Tensor) -> torch.Tensor:
        if self.ensemble == 1:
            return self._run_once(batch)
        # The x8 self-ensemble: every flip and 90-degree rotation, each undone, averaged.
        total = None
        for rotations in range(4):
            for flip in (False, True):
                view = torch.rot90(batch, rotations, dims=(-2, -1))
                view = view.flip(-1) if flip else view
                result = self._run_once(view)
                result = result.flip(-1) if flip else result
                result = torch.rot90(result, -rotations, dims=(-2, -1))
                total = result if total is None else total + result
        return total / 8

    def _run_once(self, batch: torch.Tensor) -> torch.Tensor:
        assert self.network is not None
        factor = self.predict_pd
        # bfloat16 on CUDA; CPUs predict in float32, where tiles reproduce the whole image.
        fast = self.fit_config.mixed_precision and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=fast):
            return pd_up(self.network(pd_down(batch, factor)), factor).float()

    def _predictor(self) -> TiledPredictor:
        assert self.network is not None
        granularity = self.network.size_multiple * self.predict_pd
        overlap = min(self.tile_overlap, self.tile_size // 2)
        # Tiles start on the network's grid, so a tile must exceed its overlap by a grid step.
        tile = max(granularity, (self.tile_size // granularity) * granularity, round_up(overlap + granularity, granularity))
        return TiledPredictor(self._run_network, granularity, tile, overlap, self.predict_batch_size, self.device)

    def minimum_size(self) -> int:
        """The smallest H and W that predict accepts."""
        if self.network is None:
            return network_preset(self.preset).size_multiple * self.predict_pd
        return self.network.size_multiple * self.predict_pd

    def predict(
        self,
        data,
        axes: str | None = None,
        out=None,
        callback: Callable[[PredictProgress], None] | None = None,
    ):
        """Denoise `data` plane by plane; float32 in the input's units, same shape.

        `data` may be any array with numpy slicing (numpy, memmap, dask, zarr); it is read
        one plane at a time. With `out` (same shape, any array that accepts assignment) the
        result is written there and `out` is returned.
        """
        return drive(self.predict_iter(data, axes, out), callback)

    def predict_iter(self, data, axes: str | None = None, out=None) -> Generator[PredictProgress, None, Any]:
        """predict() as a generator that yields progress after every batch of tiles."""
        if not self.is_fitted:
            raise RuntimeError("this Denoiser has not been fitted yet: call fit() or Denoiser.load() first")
        assert self.network is not None and self.normalizer is not None
        check_data(data)
        if axes is None:
            axes = self.axes if self.axes is not None and len(self.axes) == len(data.shape) else guess_axes(data.shape)
        layout = PlaneLayout.of(data.shape, axes)
        if layout.channels != self.network.config.in_channels:
            raise ValueError(
                f"the model was fitted on {self.network.config.in_channels} channel(s), the data has "
                f"{layout.channels} (axes {layout.axes!r}); check the axes"
            )
        if min(layout.height, layout.width) < self.minimum_size():
            raise ValueError(
                f"the image is {layout.height}x{layout.width} pixels; this model needs at least "
                f"{self.minimum_size()}x{self.minimum_size()}"
            )
        if out is None:
            out = np.empty(tuple(data.shape), dtype=np.float32)
        elif tuple(out.shape) != tuple(data.shape):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(data.shape)}")
        self._cancel.clear()
        self.network.to(self.device).eval()
        predictor = self._predictor()
        planes = layout.plane_count
        start = time.perf_counter()
        for number, plane in enumerate(layout.plane_indices()):
            block = layout.read_plane(data, plane)
            check_finite(block, f"plane {plane} of the input")
            steps = predictor.predict_iter(self.normalizer.normalize(block))
            try:
                while True:
                    done, total = next(steps)
                    if self._cancel.is_set():
                        raise PredictionCancelled("prediction stopped by cancel()")
                    fraction = (number + done / total) / planes
                    elapsed = time.perf_counter() - start
                    eta = elapsed * (1 - fraction) / fraction if fraction > 0 else None
                    yield PredictProgress(number, planes, done, total, elapsed, eta, fraction)
            except StopIteration as finished:
                result = finished.value
            except torch.OutOfMemoryError as error:
                raise out_of_memory_error(self.device, "denoising") from error
            layout.write_plane(out, plane, self.normalizer.denormalize(result[: layout.channels]))
            release_pages(data)
            release_pages(out)
        return out

    # -- model files -------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Everything saved beside the weights."""
        if not self.is_fitted:
            raise RuntimeError("nothing to save: fit() the Denoiser first")
        assert self.network is not None and self.normalizer is not None
        return {
            "preset": self.preset,
            "network": self.network.config.to_dict(),
            "channels": self.network.config.in_channels,
            "normalization": self.normalizer.to_dict(),
            "axes": self.axes,
            "pd": self.pd,
            "seed": self.seed,
            "fit": self.fit_config.to_dict(),
            "tiling": {"tile_size": self.tile_size, "tile_overlap": self.tile_overlap, "ensemble": self.ensemble},
            "training": dataclasses.asdict(self.summary) if self.summary else None,
            "package_version": __version__,
        }

    def save(self, path: str | Path) -> Path:
        """Write weights (safetensors) and description (JSON header) atomically to `path`."""
        description = self.describe()
        assert self.network is not None
        return save_model(path, self.network.state_dict(), description)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "auto") -> "Denoiser":
        state, description = load_model(path)
        try:
            config = NetworkConfig.from_dict(description["network"])
            denoiser = cls(
                preset=description.get("preset", "small"),
                pd=int(description.get("pd", 1)),
                device=device,
                seed=int(description.get("seed", 0)),
                fit_config=FitConfig.from_dict(description.get("fit", {})),
                **description.get("tiling", {}),
            )
            network = TBSN(config)
            network.load_state_dict(state, strict=True)
            normalizer = Normalizer.from_dict(description["normalization"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise ModelFileError(f"{path} does not describe a usable TBSN model: {error}") from error
        denoiser.network = network.to(denoiser.device).eval()
        denoiser.normalizer = normalizer
        denoiser.axes = description.get("axes")
        training = description.get("training")
        denoiser.summary = TrainingSummary(**training) if training else None
        return denoiser
