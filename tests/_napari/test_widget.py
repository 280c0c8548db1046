"""The dock widget, driven like a user would, in a real napari viewer (Xvfb in CI)."""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest

pytest.importorskip("napari")
from napari.utils.notifications import notification_manager  # noqa: E402
from qtpy.QtCore import QTimer  # noqa: E402

from napari_tbsn import DenoiseWidget  # noqa: E402
from napari_tbsn._napari.noise_plot import CHANNEL_COLOURS  # noqa: E402
from napari_tbsn._napari.sample_data import noisy_nuclei  # noqa: E402

from ..conftest import noisy_image  # noqa: E402

WAIT_MS = 180_000


@pytest.fixture
def viewer_and_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = DenoiseWidget(viewer)
    viewer.window.add_dock_widget(widget, name="TBSN Denoise")
    widget.form.preset_select.value = "tiny"
    return viewer, widget


def _wait_idle(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)


def _fit_plain(viewer, widget, qtbot):
    """A 64x64 layer "plain" and a model fitted on it for 2 iterations; returns the layer's data."""
    _, noisy = noisy_image((64, 64))
    viewer.add_image(noisy, name="plain")
    widget.form.iterations.value = 2
    widget.fit_button.click()
    _wait_idle(qtbot, widget)
    return noisy


def _event_loop_gaps():
    """Start timing the Qt event loop; the returned function stops and gives the longest gap (s)
    between two 20 ms timer ticks: how long napari could not answer the user."""
    ticks = [time.perf_counter()]
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(20)

    def stop() -> float:
        timer.stop()
        ticks.append(time.perf_counter())
        return max(b - a for a, b in zip(ticks, ticks[1:]))

    return stop


def test_fit_stop_denoise_end_to_end(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    data, meta, _ = noisy_nuclei()[0]
    layer = viewer.add_image(data[:3], scale=(2.0, 0.25, 0.25), translate=(0, 5, 5), **meta)
    original = layer.data.copy()
    assert widget.form.layer_select.value is layer and widget.form.axes.value == "ZYX"

    widget.form.iterations.value = 100_000
    widget.form.time_budget.value = 0
    ticks: list[int] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(25)
    widget.fit_button.click()
    assert widget.busy and not widget.fit_button.isEnabled() and widget.stop_button.isEnabled()
    qtbot.waitUntil(lambda: len(widget.loss_plot.training) >= 3, timeout=WAIT_MS)
    ticks_during_fit = len(ticks)
    widget.stop_button.click()
    _wait_idle(qtbot, widget)
    timer.stop()
    assert ticks_during_fit >= 3, "the event loop stalled during the fit"
    summary = widget.denoiser.summary
    assert summary.stopped_early and 3 <= summary.iterations < 100_000
    assert summary.best_validation_loss is not None

    widget.denoise_button.click()
    _wait_idle(qtbot, widget)
    result = viewer.layers["noisy nuclei (TBSN)"]
    assert result.data.shape == layer.data.shape and result.data.dtype == np.float32
    np.testing.assert_allclose(result.scale, layer.scale)
    np.testing.assert_allclose(result.translate, layer.translate)
    assert tuple(result.axis_labels) == ("Z", "Y", "X")
    np.testing.assert_array_equal(layer.data, original)
    assert widget.fit_button.isEnabled() and not widget.stop_button.isEnabled()


def test_bad_axes_are_shown_and_the_widget_recovers(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    _, noisy = noisy_image((64, 64))
    viewer.add_image(noisy, name="plain")
    assert widget.form.axes.value == "YX"
    widget.form.axes.value = "YQ"
    widget.fit_button.click()
    assert not widget.busy and "unknown letters" in widget.status.text()
    # An error inside the worker (NaN pixels) arrives as a message; the widget stays usable.
    broken = noisy.copy()
    broken[3, 3] = np.nan
    viewer.add_image(broken, name="broken")
    widget.form.iterations.value = 2
    widget.fit_button.click()
    _wait_idle(qtbot, widget)
    assert "NaN" in widget.status.text()
    widget.form.layer_select.value = viewer.layers["plain"]
    widget.fit_button.click()
    _wait_idle(qtbot, widget)
    assert widget.denoiser is not None and widget.denoiser.is_fitted


def test_time_series_and_3d_layers_with_fit_and_denoise(viewer_and_widget, qtbot, tmp_path):
    dask_array = pytest.importorskip("dask.array")
    viewer, widget = viewer_and_widget
    _, series = noisy_image((3, 64, 96), seed=2)
    lazy = dask_array.from_array(series, chunks=(1, 64, 96))
    timelapse = viewer.add_image(lazy, name="timelapse", axis_labels=("T", "Y", "X"))
    assert widget.form.axes.value == "TYX"
    widget.form.iterations.value = 3
    assert widget.form.pd.value == "auto" and widget.form.estimator.value == "posterior" and widget.form.context.value == "auto"
    widget.form.context.value = 1  # the neighbouring frames (auto gives Z-stacks only)
    widget.form.uncertainty.value = True
    widget.fit_denoise_button.click()
    _wait_idle(qtbot, widget)
    assert viewer.layers["timelapse (TBSN)"].data.shape == (3, 64, 96)
    assert widget.denoiser.context_planes == 1
    spread = viewer.layers["timelapse (TBSN) uncertainty"].data
    assert spread.shape == (3, 64, 96) and np.all(np.asarray(spread) > 0)
    assert timelapse.data is lazy
    status = widget.status.text()
    assert "estimated PSNR" in status and "uncertainty" in status
    widget.form.uncertainty.value = False

    # A saved model loads and denoises a TZYX layer; Preview does the shown slice only.
    path = widget.save_model(tmp_path / "model.safetensors")
    widget.noise_plot.clear()
    widget.load_model(path)
    assert widget.noise_plot.model == widget.denoiser.noise_model is not None
    assert widget.noise_plot.measurement == widget.denoiser.noise_measurement is not None
    _, stack = noisy_image((2, 2, 64, 64), seed=3)
    viewer.add_image(stack, name="tzyx", axis_labels=("T", "Z", "Y", "X"))
    assert widget.form.axes.value == "TZYX"
    viewer.dims.set_current_step(0, 1)
    viewer.dims.set_current_step(1, 1)
    widget.preview_button.click()
    _wait_idle(qtbot, widget)
    preview = viewer.layers["tzyx (TBSN preview)"]
    assert preview.data.shape == (1, 1, 64, 64)
    np.testing.assert_allclose(preview.translate[:2], (1, 1))
    widget.denoise_button.click()
    _wait_idle(qtbot, widget)
    assert viewer.layers["tzyx (TBSN)"].data.shape == (2, 2, 64, 64)


def test_layer_choices_follow_the_viewer(viewer_and_widget):
    viewer, widget = viewer_and_widget
    first = viewer.add_image(np.zeros((64, 64), np.float32), name="a")
    viewer.add_points(np.zeros((1, 2)), name="points")
    def images():
        return [choice for choice in widget.form.layer_select.choices if choice is not None]

    assert images() == [first] and widget.form.layer_select.value is first
    viewer.layers.remove(first)
    assert images() == [] and widget.form.layer_select.value is None


def test_closing_the_widget_stops_a_running_fit(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    _, noisy = noisy_image((128, 128))
    viewer.add_image(noisy, name="plain")
    widget.form.iterations.value = 100_000
    widget.form.time_budget.value = 0
    widget.fit_button.click()
    qtbot.waitUntil(lambda: len(widget.loss_plot.training) >= 1, timeout=WAIT_MS)
    cancel = widget._stops.cancel
    viewer.window.remove_dock_widget(widget)
    widget.deleteLater()
    from napari_tbsn._napari.widget import _RUNNING_WORKERS

    qtbot.waitUntil(lambda: cancel.is_set() and not _RUNNING_WORKERS, timeout=WAIT_MS)


def test_a_calibrated_camera_noise_model_from_the_widget(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    _, noisy = noisy_image((64, 64))
    viewer.add_image(noisy, name="camera")
    widget.form.iterations.value = 2
    widget.form.time_budget.value = 0
    widget.form.camera_gain.value = 10.0  # read noise still 0: a pure shot-noise model
    widget.form.baseline.value = 1.0
    widget.fit_button.click()
    _wait_idle(qtbot, widget)
    model = widget.denoiser.noise_model
    assert model.given and model.gain == (10.0,) and model.offset == (-10.0,)
    assert "(given)" in widget.details.text()
    # Photons with read noise 1 against gain 10 above baseline 1: the status gives the ratio,
    # and the fit's warning of the mismatch reaches napari's notifications from its thread.
    assert re.search(r"the noise measured on the data is 0\.\d+x that", widget.details.text())
    warned = [n.message for n in notification_manager.records if str(n.severity) == "warning"]
    assert any(message.startswith("the noise measured on the data is 0.") for message in warned), warned
    # The noise plot shows the given model's line beside the noise measured on the layer.
    plot = widget.noise_plot
    assert plot.model == model and len(plot.measurement.signal[0]) == 32
    drawn = _colours_drawn(plot)
    assert _rgb(CHANNEL_COLOURS[0]) in drawn and _rgb(CHANNEL_COLOURS[0].lighter(140)) in drawn
    plot.clear()
    assert _rgb(CHANNEL_COLOURS[0]) not in _colours_drawn(plot)


def _rgb(colour) -> tuple[int, int, int]:
    return colour.red(), colour.green(), colour.blue()


def _colours_drawn(widget) -> set[tuple[int, int, int]]:
    image = widget.grab().toImage()
    return {_rgb(image.pixelColor(x, y)) for x in range(image.width()) for y in range(image.height())}


@pytest.mark.parametrize("bad, words", [
    (np.zeros((10, 10), np.float32), "at least"),
    (np.full((64, 64), 5.0, np.float32), "constant"),
    (np.where(np.eye(64, dtype=bool), np.inf, 1.0).astype(np.float32), "infinite"),
    (np.ones((64, 64), bool), "dtype"),
])
def test_bad_layers_give_one_line_and_leave_the_widget_usable(viewer_and_widget, qtbot, bad, words):
    viewer, widget = viewer_and_widget
    original = bad.copy()
    viewer.add_image(bad, name="bad")
    widget.form.iterations.value = 2
    widget.fit_button.click()
    _wait_idle(qtbot, widget)
    assert words in widget.status.text() and "\n" not in widget.status.text()
    np.testing.assert_array_equal(viewer.layers["bad"].data, original)
    assert widget.fit_button.isEnabled() and widget.denoiser is None


def test_settings_are_read_on_the_gui_thread_and_never_stick_to_the_model(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    noisy = _fit_plain(viewer, widget, qtbot)
    model = widget.denoiser.model
    # A denoise with the plain mean.
    widget.form.estimator.value = "blind_spot"
    widget.denoise_button.click()
    widget.form.estimator.value = "posterior"  # changed while the worker runs: not seen by it
    _wait_idle(qtbot, widget)
    plain = np.asarray(viewer.layers["plain (TBSN)"].data)
    np.testing.assert_allclose(plain, widget.denoiser.predict(noisy, "YX", estimator="blind_spot"), atol=1e-5)
    assert widget.denoiser.model is model and widget.denoiser.estimator == "posterior"
    assert widget.denoiser.describe()["estimator"] == "posterior"  # nothing stuck to the saved model


def test_a_stopped_fine_tune_keeps_the_previous_model_and_camera_fields_can_go_back(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    _, noisy = noisy_image((128, 128))
    viewer.add_image(noisy, name="plain")
    widget.form.iterations.value = 2
    widget.form.time_budget.value = 0
    widget.form.camera_gain.value, widget.form.read_noise.value = 1.0, 1.0
    widget.fit_button.click()
    _wait_idle(qtbot, widget)
    fitted = widget.denoiser
    assert fitted.noise_model.given
    widget.form.iterations.value = 100_000
    widget.fit_button.click()
    qtbot.waitUntil(lambda: len(widget.loss_plot.training) >= 2, timeout=WAIT_MS)
    widget.stop_button.click()  # ends the training...
    widget.stop_button.click()  # ...and a second Stop cancels the fine-tune
    _wait_idle(qtbot, widget)
    assert widget.denoiser is fitted and "previous model is unchanged" in widget.status.text()
    # Camera fields back to 0: the fine-tune estimates the noise again.
    widget.form.camera_gain.value, widget.form.read_noise.value = 0.0, 0.0
    widget.form.iterations.value = 2
    widget.fit_button.click()
    _wait_idle(qtbot, widget)
    assert widget.denoiser is not fitted and not widget.denoiser.noise_model.given


def test_fit_and_denoise_with_a_student_then_export(viewer_and_widget, qtbot, tmp_path, monkeypatch):
    viewer, widget = viewer_and_widget
    _, image = noisy_image((128, 128), seed=6)
    viewer.add_image(image, name="cells")
    widget.form.iterations.value = 3
    widget.form.time_budget.value = 0
    widget.form.student.value = "on"
    seen = []
    show = widget.progress_bar.setFormat
    widget.progress_bar.setFormat = lambda text: (seen.append(text), show(text))
    widget.fit_denoise_button.click()
    _wait_idle(qtbot, widget)
    assert widget.denoiser.student is not None
    assert any(text.startswith("distil: teacher targets, plane") for text in seen)
    assert any(text.startswith("distil: checking the student, plane") for text in seen)
    assert any(text.startswith("distil: student iteration") for text in seen)
    assert len(widget.loss_plot.training) == widget.denoiser.student.summary.iterations  # the student's loss
    assert "denoised by the distilled student" in widget.status.text()
    assert "student: distilling a student (student on)" in widget.details.text()
    assert viewer.layers["cells (TBSN)"].data.shape == (128, 128)

    widget.form.student.value = "off"  # predict with the teacher
    widget.denoise_button.click()
    _wait_idle(qtbot, widget)
    assert "denoised by the TBSN teacher" in widget.status.text()

    pytest.importorskip("bioimageio.spec")
    from napari_tbsn import Denoiser

    threads, export = [], Denoiser.export_bioimageio
    monkeypatch.setattr(Denoiser, "export_bioimageio",
                        lambda self, *a, **k: (threads.append(threading.current_thread()), export(self, *a, **k))[1])
    gaps = _event_loop_gaps()
    widget.export_model(tmp_path / "cells.bioimageio.zip")
    assert widget.busy  # the export runs in a worker, not on the GUI thread
    _wait_idle(qtbot, widget)
    largest_gap = gaps()
    assert (tmp_path / "cells.bioimageio.zip").is_file() and "exported" in widget.status.text()
    assert threads and threads[0] is not threading.main_thread()
    print(f"longest event-loop gap during the export: {largest_gap:.3f} s")
    assert largest_gap < 0.5, "napari froze during the export"


def test_a_result_file_gets_the_denoised_stack_as_ome_zarr_and_the_layer_reads_it(viewer_and_widget, qtbot, tmp_path):
    pytest.importorskip("ome_zarr")
    viewer, widget = viewer_and_widget
    _, stack = noisy_image((3, 64, 64), seed=8)
    viewer.add_image(stack, name="stack", scale=(2.0, 0.5, 0.5), axis_labels=("Z", "Y", "X"))
    widget.form.iterations.value = 2
    widget.form.result_file.value = tmp_path / "stack_denoised"  # not a zarr name: refused with the fix
    widget.fit_denoise_button.click()
    assert "name it stack_denoised.ome.zarr" in widget.status.text()
    target = tmp_path / "stack_denoised.ome.zarr"
    widget.form.result_file.value = target
    widget.fit_denoise_button.click()
    _wait_idle(qtbot, widget)
    layer = viewer.layers["stack (TBSN)"]
    assert type(layer.data).__module__.startswith("zarr")  # shown from the file, not held in memory
    from napari_tbsn.image_io import read_image

    saved = read_image(target)
    assert saved.axes == "ZYX" and saved.metadata["ome"]["scale"] == [2.0, 0.5, 0.5]
    np.testing.assert_allclose(saved.data[:], widget.denoiser.predict(stack, "ZYX"), atol=1e-5)
    widget.preview_button.click()  # a preview never touches the result file
    _wait_idle(qtbot, widget)
    np.testing.assert_array_equal(read_image(target).data[:], saved.data[:])


def test_channels_choice_from_the_widget_reaches_the_model_and_the_status(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    stains = np.stack([noisy_image((64, 64), seed=seed, peak=peak)[1] for seed, peak in ((1, 30.0), (2, 10.0))])
    viewer.add_image(stains, name="stains")
    widget.form.axes.value = "CYX"
    widget.form.iterations.value = 2
    widget.form.time_budget.value = 0
    widget.fit_button.click()
    _wait_idle(qtbot, widget)
    assert widget.denoiser.network_config.channels_as_samples  # auto: unrelated structures
    assert "channels fitted independent" in widget.details.text()
    widget.form.channels.value = "joint"  # a different choice fits a new model
    widget.fit_button.click()
    _wait_idle(qtbot, widget)
    assert not widget.denoiser.network_config.channels_as_samples
    assert "channels fitted joint: as asked" in widget.details.text()


# -- the user's data are never the result file ------------------------------------------------


def _tree_bytes(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def opened_store(viewer_and_widget, qtbot, tmp_path):
    """An OME-Zarr store opened in napari as a user would (File > Open), and a fitted model."""
    pytest.importorskip("ome_zarr")
    from napari_tbsn.image_io import open_output
    from napari_tbsn.outputs import RESULT_MARKER

    viewer, widget = viewer_and_widget
    store = tmp_path / "raw" / "stack.ome.zarr"
    with open_output(store, (3, 64, 64), "ZYX") as out:
        out[:] = noisy_image((3, 64, 64), seed=3)[1]
    # Strip our own mark: this store stands for the user's raw data, which napari-tbsn did not write.
    import zarr

    group = zarr.open_group(str(store), mode="r+")
    del group.attrs[RESULT_MARKER]
    (layer,) = viewer.open(str(store))
    widget.form.layer_select.value = layer
    widget.form.axes.value = "ZYX"
    widget.form.iterations.value = 2
    widget.form.time_budget.value = 0
    widget.fit_button.click()
    _wait_idle(qtbot, widget)
    return viewer, widget, layer, store


@pytest.mark.parametrize("where", ["itself", "its array", "a folder holding it", "through a symlink"])
def test_the_result_file_can_never_be_the_layers_own_store(opened_store, qtbot, where):
    viewer, widget, layer, store = opened_store
    before = _tree_bytes(store)
    if where == "through a symlink":
        link = store.parent.parent / "link.ome.zarr"
        link.symlink_to(store, target_is_directory=True)
    target = {"itself": store, "its array": store / "0", "a folder holding it": store.parent.parent / "all.zarr",
              "through a symlink": store.parent.parent / "link.ome.zarr"}[where]
    if where == "a folder holding it":  # the user's store inside a folder the result would replace
        store.parent.rename(target)
        (target / ".zgroup").write_text('{"zarr_format": 2}')
        store = target / "stack.ome.zarr"
        (layer,) = viewer.open(str(store))
        widget.form.layer_select.value = layer
        widget.form.axes.value = "ZYX"
    asked = []
    widget.confirm_replace = lambda path: asked.append(path) or True  # even a careless yes changes nothing
    widget.form.result_file.value = target
    for button in (widget.denoise_button, widget.fit_denoise_button):
        button.click()
        assert not widget.busy, "a job started on the layer's own store"
        assert "destroy the data being read" in widget.status.text()
    assert asked == []
    assert _tree_bytes(store) == before
    assert "stack.ome (TBSN)" not in viewer.layers


def test_replacing_a_store_napari_tbsn_did_not_write_asks_first(opened_store, qtbot, tmp_path):
    viewer, widget, layer, store = opened_store
    other = tmp_path / "yesterday.ome.zarr"  # yesterday's raw data, typed by mistake
    import shutil

    shutil.copytree(store, other)
    before = _tree_bytes(other)
    answers = []
    widget.confirm_replace = lambda path: answers.append(path) or False
    widget.form.result_file.value = other
    widget.denoise_button.click()
    assert not widget.busy and answers == [other]
    assert "did not write" in widget.status.text() and _tree_bytes(other) == before
    widget.confirm_replace = lambda path: True  # the user said yes: replaced
    widget.denoise_button.click()
    _wait_idle(qtbot, widget)
    assert _tree_bytes(other) != before and "stack.ome (TBSN)" in viewer.layers
    widget.confirm_replace = lambda path: pytest.fail("asked again about napari-tbsn's own result")
    widget.denoise_button.click()  # now a napari-tbsn result: replaced without a question
    _wait_idle(qtbot, widget)


def test_a_large_result_goes_beside_the_result_file_never_to_the_temp_folder(viewer_and_widget, qtbot, tmp_path,
                                                                             monkeypatch):
    pytest.importorskip("ome_zarr")
    import tempfile

    from napari_tbsn._napari import results

    viewer, widget = viewer_and_widget
    _fit_plain(viewer, widget, qtbot)
    monkeypatch.setattr(results, "IN_MEMORY_LIMIT", 0)  # every result counts as large
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    widget.denoise_button.click()
    _wait_idle(qtbot, widget)
    assert "choose a result file" in widget.status.text() and "plain (TBSN)" not in viewer.layers
    threads, limits = [], results.contrast_limits
    monkeypatch.setattr(results, "contrast_limits", lambda out: threads.append(threading.current_thread()) or limits(out))
    import napari_tbsn._napari.widget as widget_module

    monkeypatch.setattr(widget_module, "contrast_limits", results.contrast_limits)
    widget.form.uncertainty.value = True  # the uncertainty is held in a memory map beside the result file
    widget.form.result_file.value = tmp_path / "out" / "plain.ome.zarr"
    gaps = _event_loop_gaps()
    widget.denoise_button.click()
    _wait_idle(qtbot, widget)
    largest_gap = gaps()
    assert "plain (TBSN) uncertainty" in viewer.layers
    assert largest_gap < 0.5, f"napari froze for {largest_gap:.2f} s during the denoise"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["plain.ome.zarr"]  # the map left no file
    assert list(scratch.iterdir()) == []
    assert threads and all(thread is not threading.main_thread() for thread in threads)


def test_an_unexpected_error_is_a_notification_that_says_bug(viewer_and_widget, qtbot, monkeypatch):
    from napari_tbsn import Denoiser

    viewer, widget = viewer_and_widget
    _, noisy = noisy_image((64, 64))
    viewer.add_image(noisy, name="plain")
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", lambda message: shown.append(message))

    def broken(self, *args, **kwargs):
        raise KeyError("a bug deep inside")
        yield

    monkeypatch.setattr(Denoiser, "fit_iter", broken)
    widget.form.iterations.value = 2
    widget.fit_button.click()
    _wait_idle(qtbot, widget)
    assert shown and "this is a bug" in shown[-1] and "KeyError" in shown[-1]
    assert widget.fit_button.isEnabled()


def test_a_missing_package_for_the_result_file_is_named_before_the_fit(viewer_and_widget, qtbot, tmp_path,
                                                                       monkeypatch):
    import sys

    viewer, widget = viewer_and_widget
    _, noisy = noisy_image((64, 64))
    viewer.add_image(noisy, name="plain")
    monkeypatch.setitem(sys.modules, "ome_zarr", None)  # as if it were not installed
    widget.form.result_file.value = tmp_path / "plain.ome.zarr"
    widget.fit_denoise_button.click()
    assert not widget.busy  # refused before the fit, not after it
    assert "napari-tbsn[zarr]" in widget.status.text() and "Plugins > Install" in widget.status.text()
    assert list(tmp_path.iterdir()) == []


def test_the_widget_keeps_a_core_for_the_viewer_and_takes_the_threads_set(viewer_and_widget, qtbot, monkeypatch):
    from napari_tbsn import devices

    viewer, widget = viewer_and_widget
    _, noisy = noisy_image((64, 64))
    viewer.add_image(noisy, name="plain")
    monkeypatch.setattr(devices, "usable_cores", lambda: 4)
    monkeypatch.setattr(devices, "cores_busy_elsewhere", lambda window=0.25: 1.0)  # one core taken elsewhere
    from napari_tbsn import Denoiser

    real = Denoiser.fit_iter
    asked = []
    monkeypatch.setattr(Denoiser, "fit_iter", lambda self, *a, **k: (asked.append(k.get("threads")), real(self, *a, **k))[1])
    widget.form.iterations.value = 2
    widget.form.time_budget.value = 0
    widget.fit_button.click()
    _wait_idle(qtbot, widget)
    assert asked == [2]  # 4 cores, 1 busy elsewhere, 1 kept for the viewer
    widget.form.threads.value = 1
    widget.fit_button.click()
    _wait_idle(qtbot, widget)
    assert asked == [2, 1]


def test_the_status_leads_with_what_a_user_needs_and_a_second_fit_says_it_fine_tunes(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    _, noisy = noisy_image((64, 64))
    viewer.add_image(noisy, name="plain")
    widget.form.iterations.value = 3
    widget.form.time_budget.value = 0
    formats = []
    show = widget.progress_bar.setFormat
    widget.progress_bar.setFormat = lambda text: (formats.append(text), show(text))
    widget.fit_button.click()
    assert "fitting a new model" in widget.status.text()  # not "pick a layer" while it fits
    assert formats[-1] == "TBSN fit: starting…" and widget.progress_bar.maximum() == 0  # moving, not blank
    _wait_idle(qtbot, widget)
    headline = widget.status.text().splitlines()[0]
    assert headline.startswith("Fitted in ") and "(3 iterations)" in headline and "more time" in headline
    assert "validation loss" not in widget.status.text()  # the details sit behind Details
    assert not widget.details.isVisible() and "best validation loss" in widget.details.text()
    widget.details_button.click()
    assert widget.details.isVisibleTo(widget)
    assert widget.progress_bar.value() == 0 and widget.progress_bar.format() == "idle"

    widget.denoise_button.click()
    _wait_idle(qtbot, widget)
    assert widget.status.text().splitlines()[0] == headline and "added 'plain (TBSN)'" in widget.status.text()

    first = widget.denoiser
    widget.fit_button.click()
    assert "fine-tuning the fitted model" in widget.status.text() and "Reset" in widget.status.text()
    _wait_idle(qtbot, widget)
    assert widget.denoiser is not first
    widget.buttons["Reset"].click()
    assert widget.denoiser is None and "from scratch" in widget.status.text()
    widget.fit_button.click()
    assert "fitting a new model" in widget.status.text()
    _wait_idle(qtbot, widget)


def test_messages_name_the_fix_that_applies_and_planes_as_napari_shows_them(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget  # the tiny preset is chosen
    viewer.add_image(noisy_image((20, 20))[1], name="small")
    widget.form.iterations.value = 2
    widget.fit_button.click()
    _wait_idle(qtbot, widget)
    assert "at least 64x64" in widget.status.text() and "choose the tiny preset" not in widget.status.text()
    stack = noisy_image((16, 128, 128))[1]
    viewer.add_image(stack, name="stack")
    widget.form.axes.value = "YXZ"  # wrong: the stack is ZYX
    widget.fit_button.click()
    _wait_idle(qtbot, widget)
    assert "are the axes right? YXZ makes the plane 16x128 while Z has 128 pixels" in widget.status.text()
    broken = stack.copy()
    broken[4, 10, 10] = np.nan
    viewer.add_image(broken, name="broken")
    widget.form.axes.value = "ZYX"
    widget.fit_button.click()
    _wait_idle(qtbot, widget)
    assert "Z plane 4 of the input contains NaN" in widget.status.text()


def test_export_without_a_student_offers_to_distil_one_now(viewer_and_widget, qtbot, tmp_path):
    pytest.importorskip("bioimageio.spec")
    viewer, widget = viewer_and_widget
    viewer.add_image(noisy_image((128, 128), seed=6)[1], name="cells")
    widget.form.iterations.value = 3
    widget.form.time_budget.value = 0
    widget.form.student.value = "off"
    widget.fit_button.click()
    _wait_idle(qtbot, widget)
    assert widget.denoiser.student is None
    asked = []
    widget.confirm_distil = lambda settings: asked.append(settings.layer.name) or False
    widget.export_model(tmp_path / "cells.bioimageio.zip")
    assert asked == ["cells"] and not widget.busy
    assert "press Export again and choose Distil" in widget.status.text()
    widget.confirm_distil = lambda settings: True
    widget.export_model(tmp_path / "cells.bioimageio.zip")
    assert widget.busy
    _wait_idle(qtbot, widget)
    assert widget.denoiser.student is not None and (tmp_path / "cells.bioimageio.zip").is_file()
    assert "exported the student" in widget.status.text()


def test_a_bug_in_the_denoise_after_a_fit_keeps_the_fitted_model(viewer_and_widget, qtbot, monkeypatch):
    from napari_tbsn import Denoiser

    viewer, widget = viewer_and_widget
    viewer.add_image(noisy_image((64, 64))[1], name="plain")

    def broken(self, *args, **kwargs):
        raise KeyError("a bug in the denoise")

    monkeypatch.setattr(Denoiser, "predict_iter", broken)
    widget.form.iterations.value = 2
    widget.form.time_budget.value = 0
    widget.fit_denoise_button.click()
    _wait_idle(qtbot, widget)
    assert widget.denoiser is not None and widget.denoiser.is_fitted  # the fit is not lost
    assert "the fit succeeded, the denoise failed" in widget.status.text() and "this is a bug" in widget.status.text()


def test_fit_and_preview_neither_check_nor_ask_about_the_result_file(opened_store, qtbot, tmp_path):
    viewer, widget, layer, store = opened_store
    widget.confirm_replace = lambda path: pytest.fail("asked about a file this job does not write")
    widget.form.result_file.value = store  # would be refused for Denoise
    widget.preview_button.click()
    _wait_idle(qtbot, widget)
    assert "stack.ome (TBSN preview)" in viewer.layers
    widget.fit_button.click()
    _wait_idle(qtbot, widget)
    assert widget.status.text().startswith("Fitted in")


def test_results_can_keep_the_inputs_type_and_rgb_images_always_do(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    counts = np.clip(noisy_image((64, 64))[1] * 50 + 100, 0, None).astype(np.uint16)
    viewer.add_image(counts, name="counts")
    widget.form.iterations.value = 2
    widget.form.time_budget.value = 0
    widget.fit_denoise_button.click()
    _wait_idle(qtbot, widget)
    assert viewer.layers["counts (TBSN)"].data.dtype == np.float32 and "(float32)" in widget.status.text()
    exact = np.asarray(viewer.layers["counts (TBSN)"].data)
    widget.form.result_type.value = "same"
    widget.denoise_button.click()
    _wait_idle(qtbot, widget)
    typed = viewer.layers["counts (TBSN) [1]"].data
    assert typed.dtype == np.uint16 and "(uint16)" in widget.status.text()
    np.testing.assert_array_equal(typed, np.clip(np.rint(exact), 0, 65535))

    widget.form.result_type.value = "float32"
    rgb = np.stack([noisy_image((64, 64), seed=s)[1] * 10 for s in range(3)], axis=-1).clip(0, 255).astype(np.uint8)
    layer = viewer.add_image(rgb, name="rgb", rgb=True)
    widget.form.layer_select.value = layer
    assert widget.form.axes.value == "YXC"
    widget.fit_denoise_button.click()
    _wait_idle(qtbot, widget)
    result = viewer.layers["rgb (TBSN)"]
    assert result.rgb and result.data.dtype == np.uint8  # an RGB image keeps its type: never a white float RGB
    assert not np.all(result.thumbnail[..., :3] == 255)


def test_the_loss_plot_has_a_legend_and_labels(viewer_and_widget, qtbot):
    from napari_tbsn._napari.loss_plot import TRAINING_COLOUR, VALIDATION_COLOUR

    viewer, widget = viewer_and_widget
    plot = widget.loss_plot
    plot.resize(400, 160)
    for iteration in range(1, 20):
        plot.add(iteration, 1.0 / iteration, 1.2 / iteration if iteration % 5 == 0 else None)
    image = plot.grab().toImage()
    legend = {_rgb(image.pixelColor(x, y)) for x in range(image.width() - 150, image.width() - 130)
              for y in range(10, 30)}
    assert _rgb(TRAINING_COLOUR) in legend and _rgb(VALIDATION_COLOUR) in legend  # the legend's two swatches


def test_dark_frames_and_the_camera_choice_reach_the_fit_and_the_details(viewer_and_widget, qtbot, tmp_path):
    """A hot-pixel stack: the fit says what it found; dark frames of another size are one line
    in the status and leave the widget usable; with dark frames the fit says it used them; the
    camera set to off keeps the data as it is."""
    import tifffile

    viewer, widget = viewer_and_widget
    _, noisy = noisy_image((64, 64))
    noisy[20, 30] += 200  # a hot pixel
    viewer.add_image(noisy, name="camera")
    widget.form.iterations.value = 2
    widget.form.time_budget.value = 0
    assert widget.form.camera.value == "auto"  # the default
    widget.fit_button.click()
    _wait_idle(qtbot, widget)
    assert "1 hot pixel" in widget.details.text() and widget.denoiser.model.camera["mode"] == "auto"
    tifffile.imwrite(tmp_path / "small.tif", np.zeros((4, 32, 32), np.float32))
    widget.form.dark_frames.value = tmp_path / "small.tif"
    widget.fit_button.click()
    _wait_idle(qtbot, widget)
    assert "dark frames are 32x32 pixels but the image is 64x64" in widget.status.text()
    assert not widget.busy
    dark = np.random.default_rng(0).normal(0, 1, (8, 64, 64)).astype(np.float32)
    tifffile.imwrite(tmp_path / "dark.tif", dark)
    widget.form.dark_frames.value = tmp_path / "dark.tif"
    widget.fit_button.click()
    _wait_idle(qtbot, widget)
    assert "8 dark frame(s)" in widget.details.text() and widget.denoiser.model.camera["mode"] == "dark frames"
    widget.form.dark_frames.line_edit.value = ""
    widget.form.camera.value = "off"
    widget.fit_button.click()
    _wait_idle(qtbot, widget)
    assert widget.denoiser.model.camera["mode"] == "off", widget.status.text()
    assert "camera:" not in widget.details.text()


def test_fit_on_two_layers_and_denoise_both(viewer_and_widget, qtbot):
    """One model fitted on two layers of the same axes (different sizes); Fit & Denoise adds a
    result layer for each, with its source's name and scale; the sources are unchanged."""
    viewer, widget = viewer_and_widget
    first = viewer.add_image(noisy_image((64, 96))[1], name="field 1", scale=(0.5, 0.5))
    second = viewer.add_image(noisy_image((80, 64), seed=3)[1], name="field 2", scale=(0.25, 0.25))
    originals = first.data.copy(), second.data.copy()
    widget.form.layer_select.value = first
    assert second in widget.form.more_layers.choices and first not in widget.form.more_layers.choices
    widget.form.more_layers.value = [second]
    assert widget.denoise_button.text() == "Denoise all (2)"
    widget.form.iterations.value = 2
    widget.form.time_budget.value = 0
    widget.form.student.value = "off"
    widget.fit_denoise_button.click()
    _wait_idle(qtbot, widget)
    model = widget.denoiser.model
    assert [image["name"] for image in model.fitted_on] == ["field 1", "field 2"]
    assert "on 2 images" in widget.status.text()
    for layer, original in zip((first, second), originals):
        result = viewer.layers[f"{layer.name} (TBSN)"]
        assert result.data.shape == layer.data.shape
        np.testing.assert_allclose(result.scale, layer.scale)
        np.testing.assert_array_equal(layer.data, original)

    viewer.layers.remove(f"{first.name} (TBSN)")
    viewer.layers.remove(f"{second.name} (TBSN)")
    widget.form.more_layers.value = [second]
    widget.denoise_button.click()  # Denoise: every chosen layer, with the model held
    _wait_idle(qtbot, widget)
    assert f"{first.name} (TBSN)" in viewer.layers and f"{second.name} (TBSN)" in viewer.layers
    assert "added 2 denoised layers" in widget.status.text()
