"""Take the README screenshot: napari with the TBSN widget docked, after a fit and a denoise.

Run under a virtual display, as CI would:  xvfb-run -a .venv/bin/python scripts/screenshot.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

from napari_tbsn import DenoiseWidget
from napari_tbsn._napari.sample_data import noisy_nuclei

OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "screenshot.png"


def wait_until_idle(widget: DenoiseWidget, limit_s: float = 900) -> None:
    deadline = time.monotonic() + limit_s
    while widget.busy and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.02)
    if widget.busy:
        sys.exit("the widget did not finish in time")


def main() -> None:
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 900)
    (data, meta, _), = noisy_nuclei()
    viewer.add_image(data, **meta)
    widget = DenoiseWidget(viewer)
    viewer.window.add_dock_widget(widget, name="TBSN Denoise", area="right")
    widget.form.preset_select.value = "small"
    widget.form.iterations.value = 0
    widget.form.time_budget.value = float(sys.argv[1]) if len(sys.argv) > 1 else 90.0
    widget.fit_denoise_button.click()
    wait_until_idle(widget)
    viewer.dims.set_current_step(0, 8)
    viewer.grid.enabled = True
    viewer.reset_view()
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.05)
    OUTPUT.parent.mkdir(exist_ok=True)
    viewer.screenshot(str(OUTPUT), canvas_only=False)
    print(f"wrote {OUTPUT}: {widget.status.text()}")
    viewer.close()


if __name__ == "__main__":
    main()
