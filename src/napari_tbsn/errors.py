"""Which errors are the user's to fix and which are ours: one rule for the CLI and the widget.

A user's error (a bad file, a wrong option, a full disk, a missing optional package, a GPU out
of memory) is one line that says what to do. Anything else is a bug in napari-tbsn or below it:
it is reported as one, with where it happened, never dressed up as the user's mistake.
"""

from __future__ import annotations

import traceback

# Optional packages, and the napari-tbsn extra that installs each.
EXTRAS = {
    "zarr": "zarr", "ome_zarr": "zarr", "distributed": "distributed", "dask": "distributed",
    "bioimageio": "export", "napari": "napari",
}


class UserError(RuntimeError):
    """A state the user can change (run without torchrun, resume a failed cluster job...).

    A RuntimeError for the callers that already catch one; the message says what to do."""


class BadInput(TypeError, ValueError):
    """Input of the wrong kind (complex pixels, axes that are not a string): a TypeError for
    Python callers, and bad input, like any ValueError, for the CLI and the widget."""


class MissingDependency(ImportError, ValueError):
    """An optional package is not installed; the message names the extra that installs it.

    Also a ValueError, so every front end that reports bad input reports this the same way."""

    def __init__(self, feature: str, module: str) -> None:
        extra = EXTRAS.get(module.split(".")[0], "")
        install = f"pip install 'napari-tbsn[{extra}]'" if extra else f"pip install {module}"
        super().__init__(f"{feature} needs the {module} package, which is not installed: {install} "
                         "(in napari: Plugins > Install/Uninstall Plugins, or the same pip command in the "
                         "Python napari runs with), then restart")
        self.name = module


def is_user_error(error: BaseException) -> bool:
    """Whether `error` is the user's to fix (report its message) rather than a bug. An import
    that fails inside napari-tbsn itself is a bug; one of another package is the installation's."""
    from .devices import OutOfMemory

    if isinstance(error, ImportError) and not isinstance(error, MissingDependency):
        return not (error.name or "").startswith("napari_tbsn")
    return isinstance(error, (ValueError, OSError, MemoryError, FloatingPointError, UserError,
                              OutOfMemory))


def _missing_optional(error: ImportError) -> MissingDependency | None:
    """The optional package a failed import is missing, where it is one we name an extra for."""
    name = error.name or ""
    if isinstance(error, ModuleNotFoundError) and name.split(".")[0] in EXTRAS:
        return MissingDependency("this step", name)
    return None


def one_line(error: BaseException) -> str:
    """The first line of an error's message (its type where it has none)."""
    text = str(error).strip()
    if isinstance(error, ImportError):
        missing = _missing_optional(error)
        if missing is not None:
            return str(missing)
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.strerror}: {error.filename}"
    return text.splitlines()[0] if text else type(error).__name__


def describe_bug(error: BaseException, frames: int = 3) -> str:
    """A bug report in a few lines: what failed, where (the innermost `frames` frames)."""
    where = "".join(traceback.format_tb(error.__traceback__)[-frames:]).rstrip()
    return (f"internal error, this is a bug in napari-tbsn (please report it with these lines; "
            f"--debug or TBSN_DEBUG=1 shows the whole traceback): {type(error).__name__}: {error}\n{where}")
