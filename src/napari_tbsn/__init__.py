"""napari-tbsn: self-supervised Transformer-Based Blind-Spot Network denoising for microscopy."""

from __future__ import annotations

from .network import TBSN

__version__ = "0.1.0"
__all__ = ["TBSN", "__version__"]
