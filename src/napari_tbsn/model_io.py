"""Model files: safetensors weights with the JSON description in the file's header.

One file holds everything; loading reads tensors and a JSON string and never unpickles.
Files are written to a temporary name and renamed, so a crash never leaves half a model.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .outputs import fsync_folder, fsync_path

FORMAT_NAME = "napari-tbsn-model"
FORMAT_VERSION = 2  # 2: a distilled student may be saved beside the teacher; tile_size may be "auto"
METADATA_KEY = "napari_tbsn"


class ModelFileError(ValueError):
    """A model file that is missing, corrupt, or not a napari-tbsn model."""


def atomic_target(path: Path) -> Path:
    """A new, empty, hidden file beside `path`, to be written and then renamed over it.

    Created with mode 0o666 so the process umask applies: the rename carries the mode over to
    the output, which should end up like any file the user saves (mkstemp would make it 0o600).
    The random part of the name keeps two writers of the same target apart.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"cannot create the folder {path.parent} for {path.name} ({error.strerror}); "
            "a file may be in the way of one of its folders: choose another location"
        ) from error
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.partial")
        try:
            descriptor = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        except OSError as error:
            raise ValueError(f"cannot write in {path.parent} ({error.strerror}); choose another location") from error
        os.close(descriptor)
        return temporary


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed over `path` only if the block
    completes, removed otherwise."""
    path = Path(path)
    temporary = atomic_target(path)
    try:
        yield temporary
        fsync_path(temporary)  # the data on disk before the name: a crash leaves the old file or the new one
        os.replace(temporary, path)
        fsync_folder(path.parent)
    finally:
        # `finally`, not `except Exception`: Ctrl-C, SystemExit and a SIGTERM turned into an
        # exception must not leave a hidden half-written file either. After the rename there
        # is nothing left to remove.
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the whole new one."""
    with atomic_file(path) as temporary:
        temporary.write_text(text)


def save_model(path: str | os.PathLike, state: dict[str, torch.Tensor], description: dict[str, Any]) -> Path:
    from safetensors.torch import save

    path = Path(path)
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **description}
    tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state.items()}
    # Serialised in memory and written into our own hidden file: safetensors' save_file makes a
    # temporary file of its own (".tmpXXXX", mode 0600) that a killed process leaves behind.
    data = save(tensors, metadata={METADATA_KEY: json.dumps(header)})
    with atomic_file(path) as temporary:
        temporary.write_bytes(data)
    return path


def load_model(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, description) from a file written by save_model."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"no model file at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFileError(
            f"{path} is not a readable safetensors file ({error}); it may be truncated or corrupt: "
            "save the model again"
        ) from error
    if METADATA_KEY not in metadata:
        raise ModelFileError(f"{path} is a safetensors file but not a napari-tbsn model (no {METADATA_KEY} header)")
    try:
        description = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise ModelFileError(f"{path} has a damaged napari-tbsn header: {error}") from error
    if description.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path} is not a napari-tbsn model file")
    if int(description.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was written by a newer napari-tbsn (format {description['format_version']}); upgrade napari-tbsn"
        )
    return state, description
