"""napari sample data: the bundled noisy nuclei stack and its clean reference."""

from __future__ import annotations

from ..samples import SAMPLE_AXES, clean_stack, noisy_stack

_META = {"axis_labels": tuple(SAMPLE_AXES), "colormap": "gray"}


def noisy_nuclei():
    return [(noisy_stack(), {"name": "noisy nuclei", **_META}, "image")]


def clean_nuclei():
    return [(clean_stack(), {"name": "clean nuclei (reference)", **_META}, "image")]
