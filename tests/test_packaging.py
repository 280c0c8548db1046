"""The library and the CLI work where napari and Qt are not installed (a cluster, CI)."""

from __future__ import annotations

import subprocess
import sys

BLOCKED = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "superqt", "vispy")

WITHOUT_NAPARI = f"""
import importlib.abc, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")
        return None

sys.meta_path.insert(0, Absent())
import napari_tbsn
from napari_tbsn.cli import main
assert not any(name.split(".")[0] in {BLOCKED!r} for name in sys.modules), "a GUI module was imported"
sys.exit(main(sys.argv[1:]))
"""


def test_the_library_and_the_cli_run_without_napari_or_qt(tmp_path):
    result = subprocess.run([sys.executable, "-c", WITHOUT_NAPARI, "sample", "-o", str(tmp_path), "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    denoised = tmp_path / "denoised.tif"
    result = subprocess.run([sys.executable, "-c", WITHOUT_NAPARI, "denoise", str(tmp_path / "noisy.tif"), "-o",
                             str(denoised), "--preset", "tiny", "--iterations", "2", "--device", "cpu", "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert denoised.exists()


def test_napari_is_an_extra_not_a_requirement():
    from importlib.metadata import requires

    required = [r for r in requires("napari-tbsn") if "extra ==" not in r]
    assert not [r for r in required if r.split(">")[0].split("=")[0].strip().lower() in ("napari", "pyqt6", "pyqt5")]
    assert any(r.startswith("napari") and "extra ==" in r and "napari" in r.split("extra ==")[1]
               for r in requires("napari-tbsn"))
