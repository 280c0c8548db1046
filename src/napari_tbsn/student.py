"""The distilled student as the model holds it: its UNet and what its distillation did."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .network.unet import StudentConfig, UNet


@dataclass
class DistilSummary:
    """What a distillation did, saved with the student."""

    iterations: int = 0
    seconds: float = 0.0  # the whole distillation, targets included
    target_seconds: float = 0.0
    target_planes: int = 0
    best_iteration: int = 0
    best_validation_loss: float | None = None  # mean absolute difference from the teacher (normalised units)
    stopped_early: bool = False
    teacher_options: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    # The check against the teacher (distillation.check_student): the student's PSNR minus the
    # teacher's, estimated on held-out pixels; whether the student denoises by default (None: not
    # checked, as in model files saved before the check, where it does); what the check found.
    estimated_change_db: float | None = None
    preferred: bool | None = None
    check: str = ""

    def describe(self) -> str:
        from .progress import format_seconds

        best = "" if self.best_validation_loss is None else \
            f", held-out difference from the teacher {self.best_validation_loss:.3g} (L1, normalised)"
        stopped = " (stopped early)" if self.stopped_early else ""
        check = f"; {self.check}" if self.check else ""
        return (f"student distilled in {format_seconds(self.seconds)} ({self.target_planes} teacher plane(s) in "
                f"{format_seconds(self.target_seconds)}, {self.iterations} iterations{stopped}){best}{check}")


@dataclass(frozen=True, eq=False)
class Student:
    """The distilled UNet and how it was made. Run in eval mode only."""

    network: UNet
    summary: DistilSummary = field(default_factory=DistilSummary)
    # A crop of the data it was distilled on, (C [+ context], h, w) in input units, up to
    # SAMPLE_SIDE square: the test tensor of a BioImage Model Zoo export.
    sample: np.ndarray | None = None

    @property
    def config(self) -> StudentConfig:
        return self.network.config

    @property
    def preferred(self) -> bool:
        """Whether the student denoises by default: unless its check found it worse than the teacher."""
        return self.summary.preferred is not False

    def describe(self) -> dict[str, Any]:
        return {"network": self.config.to_dict(), "summary": dataclasses.asdict(self.summary)}

    @classmethod
    def from_description(cls, description: dict[str, Any], state: dict[str, torch.Tensor],
                         sample: torch.Tensor | None = None) -> Student:
        network = UNet(StudentConfig.from_dict(description["network"]))
        network.load_state_dict(state, strict=True)
        known = {field.name for field in dataclasses.fields(DistilSummary)}  # a later version's keys are skipped
        summary = {key: value for key, value in description.get("summary", {}).items() if key in known}
        return cls(network.eval(), DistilSummary(**summary),
                   None if sample is None else sample.numpy())


SAMPLE_SIDE = 256


def sample_crop(block: np.ndarray) -> np.ndarray:
    """The centre of a (C, H, W) block, at most SAMPLE_SIDE square, float32."""
    _, height, width = block.shape
    top, left = max(0, (height - SAMPLE_SIDE) // 2), max(0, (width - SAMPLE_SIDE) // 2)
    return np.ascontiguousarray(block[:, top : top + SAMPLE_SIDE, left : left + SAMPLE_SIDE], dtype=np.float32)
