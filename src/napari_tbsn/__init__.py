"""napari-tbsn: self-supervised Transformer-Based Blind-Spot Network denoising for microscopy.

The core (network, fitting, tiling, files, CLI) imports neither Qt nor napari; the napari
widget lives in `napari_tbsn._napari` and is imported only when asked for.
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

# Large CPU tensors on transparent huge pages: torch reads this at its first CPU allocation, so
# it takes effect when napari_tbsn is imported before anything allocates a tensor (the CLI, the
# widget, a script importing it first). Without it every tile-sized activation is a fresh mmap
# whose 4 KiB pages fault one by one: a 1024x1024 teacher prediction spent half its time in the
# kernel (docs/measurements.md, "Throughput"). A user's own setting, 0 included, is kept.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .config import PredictOptions  # noqa: E402
from .denoiser import Denoiser, FitProgress, PredictProgress  # noqa: E402
from .model import FittedModel  # noqa: E402
from .network import TBSN  # noqa: E402
from .camera import Calibration  # noqa: E402
from .noise import NoiseModel  # noqa: E402
from .progress import Cancelled, FitCancelled, PredictionCancelled  # noqa: E402

__all__ = ["TBSN", "Calibration", "Cancelled", "Denoiser", "DenoiseWidget", "FitCancelled", "FitProgress",
           "FittedModel", "NoiseModel", "PredictOptions", "PredictProgress", "PredictionCancelled", "__version__"]


def __getattr__(name: str):
    if name == "DenoiseWidget":  # needs napari and a Qt binding: import on demand
        from ._napari.widget import DenoiseWidget

        return DenoiseWidget
    raise AttributeError(f"module 'napari_tbsn' has no attribute {name!r}")
