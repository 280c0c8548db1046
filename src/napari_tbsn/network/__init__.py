"""The Transformer-Based Blind-Spot Network and its parts."""

from .tbsn import TBSN

__all__ = ["TBSN"]
