"""The "TBSN Denoise" dock widget: a thin layer over the Denoiser facade.

Fitting and denoising run in napari generator thread workers that yield progress, so the
viewer stays responsive. The widget reads its settings on the GUI thread into one frozen
snapshot before a worker starts, gives each job its own cancel token, and adopts a fitted
model only when the fit succeeded.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qtpy.QtWidgets import (QFileDialog, QGridLayout, QLabel, QMessageBox, QProgressBar, QPushButton, QVBoxLayout,
                            QWidget)

from ..axes import PlaneLayout
from ..channels import mode_allows
from ..denoiser import Denoiser, PredictProgress
from ..devices import choose_threads, torch_threads
from ..distillation import DistilProgress
from ..errors import describe_bug, is_user_error, one_line
from ..image_io import ImageFile, open_output, read_image
from ..jobs import FitRequest, ImageReport, JobImage, JobProgress, JobSummary, ModelReady, run_job
from ..prediction import describe_model, uses_posterior
from ..progress import Cancelled, Stops, format_seconds
from ..training import FitProgress
from .form import JobSettings, SettingsForm, layer_data
from .loss_plot import LossPlot
from .noise_plot import NoisePlot
from .results import add_result_layer, contrast_limits, in_type_of, output_array, shown_plane

if TYPE_CHECKING:
    import napari

# Workers still running, kept alive until they finish: a worker whose widget was closed and
# collected would otherwise lose the Qt object its last signals go through.
_RUNNING_WORKERS: set = set()
PROGRESS_STEPS = 1000
MODEL_FILES = "TBSN model (*.safetensors);;All files (*)"  # a model saved without the suffix stays visible
ZOO_FILES = "BioImage Model Zoo package (*.zip)"


def _reported(error: Exception) -> str:
    """An error as the status line shows it: the user's in one line; a bug said to be one (its
    traceback on the console)."""
    if is_user_error(error):
        return one_line(error)
    import traceback

    traceback.print_exception(type(error), error, error.__traceback__)
    return describe_bug(error, frames=1)


@dataclass(frozen=True)
class _Failure:
    message: str
    error: bool = True  # False for a Stop


class _Layers:
    """A job's destination in the viewer: each layer's result (in memory, or the result file)."""

    def __init__(self, settings: JobSettings) -> None:
        self.settings = settings

    def finished(self, image) -> None:
        return None

    def deliver(self, image, data, axes, layer, denoiser, cancel, threads):
        result = yield from DenoiseWidget._predict_job(denoiser, self.settings.for_layer(layer), data, cancel, threads)
        return layer, result


class DenoiseWidget(QWidget):
    """Pick an image layer, fit a TBSN on it, denoise it into a new layer."""

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.denoiser: Denoiser | None = None  # holds the last model that fitted or loaded
        self._worker = None
        self._stops: Stops | None = None  # the running job's
        self._activity = None
        self._activity_done = 0
        self._closed = False
        self._distilling = False  # whether the running job's progress is a distillation's
        self._job_fits, self._job_layers = False, 1  # what the running job does (for its messages)
        self.form = SettingsForm(self._image_layers)
        self.buttons = {name: QPushButton(name) for name in
                        ("Fit", "Stop", "Denoise", "Fit && Denoise", "Preview slice", "Reset", "Save model…",
                         "Load model…", "Export to Model Zoo…")}
        self.fit_button, self.stop_button = self.buttons["Fit"], self.buttons["Stop"]
        self.denoise_button, self.fit_denoise_button = self.buttons["Denoise"], self.buttons["Fit && Denoise"]
        self.preview_button = self.buttons["Preview slice"]
        self.progress_bar, self.status = QProgressBar(), QLabel("pick a noisy image layer, then Fit")
        self.progress_bar.setRange(0, PROGRESS_STEPS)
        self.status.setWordWrap(True)
        # The full story of the last fit (loss, noise model, channels, student): one click away.
        self.details, self.details_button = QLabel(""), QPushButton("Details ▸")
        self.details.setWordWrap(True)
        self.details.setVisible(False)
        self.details_button.setFlat(True)
        self.details_button.setEnabled(False)
        self.details_button.clicked.connect(self._toggle_details)
        self._fit_headline = ""  # the last fit's headline, kept above what follows (a denoise, a save)
        self._model_origin = ""  # "fitted" or "loaded": what a Fit now fine-tunes
        self.loss_plot, self.noise_plot = LossPlot(), NoisePlot()
        self._lay_out()
        actions = (lambda: self._fit(then_denoise=False), self.stop, self._on_denoise,
                   lambda: self._fit(then_denoise=True), self._on_preview, self.reset, self._on_save, self._on_load,
                   self._on_export)
        for button, action in zip(self.buttons.values(), actions):
            button.clicked.connect(lambda *_, action=action: action())
        for event in ("removed", "reordered"):
            getattr(viewer.layers.events, event).connect(self._refresh_layers)
        viewer.layers.events.inserted.connect(self._on_layer_inserted)
        # Closing the widget or the viewer stops a running job. Not a bound method: PyQt drops
        # those before a dying object's own destroyed signal.
        self.destroyed.connect(lambda *_: self._on_destroyed())
        # With more layers chosen, Denoise denoises them all: its label says so.
        self.form.more_layers.changed.connect(lambda chosen: self.denoise_button.setText(
            f"Denoise all ({1 + len(chosen)})" if chosen else "Denoise"))
        self._set_busy(False)
        self._refresh_layers()

    def _lay_out(self) -> None:
        grid, layout = QGridLayout(), QVBoxLayout(self)
        for index, button in enumerate(self.buttons.values()):
            grid.addWidget(button, index // 2, index % 2)
        layout.addWidget(self.form.native)
        layout.addLayout(grid)
        for widget in (self.progress_bar, self.status, self.details_button, self.details, self.loss_plot,
                       self.noise_plot):
            layout.addWidget(widget)
        layout.addStretch(1)

    def _on_destroyed(self) -> None:
        self._closed = True  # late worker signals find nothing to update
        if self._stops is not None:
            self._stops.cancel.set()

    # -- layers ------------------------------------------------------------------------
    def _image_layers(self, *_: Any) -> list:
        from napari.layers import Image

        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

    def _refresh_layers(self, *_: Any) -> None:
        select = self.form.layer_select
        select.reset_choices()
        if select.value is None and select.choices:
            select.value = select.choices[-1]
        self.form.more_layers.reset_choices()

    def _on_layer_inserted(self, event) -> None:
        """A newly opened image is the one the user most likely wants next."""
        from napari.layers import Image

        self.form.layer_select.reset_choices()
        if isinstance(event.value, Image) and not self.busy and "(TBSN" not in event.value.name:
            self.form.layer_select.value = event.value
        self.form.more_layers.reset_choices()

    # -- running work ------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """True while a fit or a denoise runs."""
        return self._worker is not None

    def _set_busy(self, busy: bool) -> None:
        for name, button in self.buttons.items():
            button.setEnabled(busy if name == "Stop" else not busy)
        self.form.enabled = not busy
        if not busy:  # an empty bar: a stopped job's part-filled bar would read as progress
            self.progress_bar.setRange(0, PROGRESS_STEPS)
            self.progress_bar.setValue(0)
            self.progress_bar.setFormat("idle")

    def _say(self, message: str, error: bool = False, details: str | None = None) -> None:
        """The status line (below the last fit's headline); an error also as a napari
        notification. `details`: the text behind Details, where there is new detail to show."""
        from napari.utils.notifications import show_error

        self.status.setText("\n".join(line for line in (self._fit_headline, message) if line))
        if details is not None:
            self.details.setText(details)
            self.details_button.setEnabled(bool(details))
        if error:
            show_error(message)

    def _toggle_details(self) -> None:
        self.details.setVisible(not self.details.isVisible())
        self.details_button.setText("Details ▾" if self.details.isVisible() else "Details ▸")

    def reset(self) -> None:
        """Forget the fitted or loaded model: the next Fit starts from scratch."""
        self.denoiser, self._fit_headline, self._model_origin = None, "", ""
        self.loss_plot.clear()
        self.noise_plot.clear()
        self._say("reset: the next Fit starts a new model from scratch", details="")

    def _start(self, job, description: str, on_done, threads: int | str = "auto") -> None:
        """Run `job(stops, threads)` (a generator) in a worker; `on_done(result)` on the GUI
        thread. `threads`: torch's CPU threads for the job; "auto": the cores free when it
        starts, less one that the viewer keeps (OpenMP threads spin against a busy core)."""
        from napari.qt.threading import create_worker
        from napari.utils import progress
        from napari.utils.notifications import notification_manager

        stops = Stops()

        def guarded():
            # Bad input found while working (NaN pixels, out of memory...) comes back as a
            # message for the user, not as a crash; anything unexpected still propagates.
            try:
                count = choose_threads(threads, keep_free=1)
                with torch_threads(count):
                    return (yield from job(stops, count))
            except Cancelled as stopped:
                return _Failure(str(stopped), error=False)
            except Exception as error:
                if not is_user_error(error):
                    raise
                return _Failure(one_line(error))

        def finish(result) -> None:
            if self._closed:
                return
            self._say(result.message, result.error) if isinstance(result, _Failure) else on_done(result)

        self._activity, self._activity_done = progress(total=PROGRESS_STEPS, desc=description), 0
        # Our own errored handler, so the worker does not re-raise the error into the event loop too.
        worker = create_worker(guarded, _start_thread=False, _connect={"errored": self._on_bug})
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(finish)
        # napari 0.9's worker means to relay warnings itself, but its relaying mixin's __init__
        # never runs; the manager drops a warning it has already shown, so a fixed napari shows it once.
        worker.warned.connect(lambda warning: notification_manager.receive_warning(*warning))
        worker.finished.connect(self._on_finished)
        _RUNNING_WORKERS.add(worker)
        worker.finished.connect(lambda: _RUNNING_WORKERS.discard(worker))
        self._worker, self._stops, self._distilling = worker, stops, False
        self._set_busy(True)
        self.progress_bar.setRange(0, 0)  # moving until the first progress arrives (noise model, first step)
        self.progress_bar.setFormat(f"{description}: starting…")
        worker.start()

    def _on_progress(self, item) -> None:
        if self._closed:
            return
        if self._stops is not None:
            self._stops.follow(item)  # on the GUI thread, in step with what the user sees
        if isinstance(item, ModelReady):
            self._on_fitted(item.denoiser, student_choice=item.note or None)
            if item.failed:
                self._say(item.note, error=True)
            return
        if isinstance(item, ImageReport):
            self._on_image(item)
            return
        step, phase = getattr(item, "step", item), getattr(item, "phase", None)
        if isinstance(step, DistilProgress) or phase == "distil":
            if not self._distilling:  # the plot now shows the student's loss
                self._distilling = True
                self.loss_plot.clear()
        if isinstance(step, DistilProgress):
            text = f"distil: {step.phase}, plane {step.plane + 1}/{step.planes}, ETA {format_seconds(step.eta)}"
        elif isinstance(step, FitProgress):
            self.loss_plot.add(step.iteration, step.loss, step.validation_loss)
            best = "" if step.best_validation_loss is None else f", best val {step.best_validation_loss:.4g}"
            phase = "distil: student" if self._distilling else "fit:"
            plateau = f"; {step.describe_plateau()} (Stop keeps the best weights)" if step.plateau else ""
            text = (f"{phase} iteration {step.iteration}, loss {step.loss:.4g}{best}, ETA {format_seconds(step.eta)}"
                    f"{plateau}")
        elif isinstance(step, PredictProgress):
            layers = f"layer {item.image + 1}/{item.images}, " if getattr(item, "images", 1) > 1 else ""
            eta = item.eta if isinstance(item, JobProgress) else step.eta
            text = f"denoise: {layers}plane {step.plane + 1}/{step.planes}, ETA {format_seconds(eta)}"
        else:
            return
        steps = int(round(item.fraction * PROGRESS_STEPS))
        if self.progress_bar.maximum() == 0:
            self.progress_bar.setRange(0, PROGRESS_STEPS)
        self.progress_bar.setFormat(text)
        self.progress_bar.setValue(steps)
        if self._activity is not None and steps > self._activity_done:
            self._activity.update(steps - self._activity_done)
            self._activity_done = steps

    def _on_image(self, report: ImageReport) -> None:
        """One layer's result (its layer added as soon as it is done), or why it failed."""
        if report.status == "done":
            self._add_result(report.result[0], report.result[1])
            return
        if report.error is not None and not is_user_error(report.error):
            _reported(report.error)  # the traceback of a bug to the console
        which = f" of '{report.name}'" if self._job_layers > 1 else ""
        if report.message.startswith("left out of the fit"):
            self._say(f"'{report.name}' was {report.message}", error=True)
            return
        fitted = "the fit succeeded, " if self._job_fits else ""
        self._say(f"{fitted}the denoise{which} failed: {report.message}", error=True)

    def _on_bug(self, error: Exception) -> None:
        """An error no check foresaw: a notification that says it is a bug, and where (the
        whole traceback goes to the console)."""
        message = _reported(error)
        if not self._closed:
            self._say(message, error=True)

    def _on_finished(self) -> None:
        self._worker = self._stops = None
        if self._activity is not None:
            self._activity.close()
            self._activity = None
        if not self._closed:
            self._set_busy(False)

    def stop(self) -> None:
        """While a fit trains: end the training, and the fit completes with the best weights
        reached. Otherwise (or pressed again): cancel the job within a second; a fine-tune then
        keeps the previous model, a denoise adds nothing."""
        stops = self._stops
        if stops is not None and stops.stop() == "training":
            self._say("ending the training: the fit completes with the best weights reached (Stop again to cancel)")

    # -- fit ---------------------------------------------------------------------------
    def _denoiser_for_fit(self, settings: JobSettings) -> Denoiser:
        """A Denoiser that fine-tunes the current model where the settings allow, else a new one."""
        current = self.denoiser
        channels = PlaneLayout.of(settings.data.shape, settings.axes).channels
        if (current is not None and current.preset == settings.preset and settings.pd in ("auto", current.pd)
                and current.model.channels == channels
                and settings.context in ("auto", current.context_planes)
                and mode_allows(settings.channels, current.model.channel_mode)):
            return Denoiser.from_model(current.model, settings.options, device=settings.device,
                                       fit_config=settings.fit_config, noise_model=settings.noise_model,
                                       camera=settings.camera)
        return Denoiser(preset=settings.preset, pd=settings.pd, device=settings.device, context=settings.context,
                        channels=settings.channels, estimator=settings.options.estimator, fit_config=settings.fit_config,
                        noise_model=settings.noise_model, tile_size=settings.options.tile_size, camera=settings.camera)

    def _read_settings(self, writes_result: bool = True) -> JobSettings | None:
        """The form, checked (a question first where the result file would replace a store
        napari-tbsn did not write); None, with the reason shown, when it cannot be used.
        `writes_result`: the job writes the result file (Denoise, Fit & Denoise), which is then
        checked; other jobs ignore it."""
        try:
            return self.form.read(confirm_replace=self.confirm_replace if writes_result else None,
                                  writes_result=writes_result)
        except ValueError as error:
            self._say(one_line(error), error=True)
            return None

    def confirm_replace(self, path: Path) -> bool:
        """Ask before the result replaces an existing store that napari-tbsn did not write."""
        answer = QMessageBox.question(
            self, "Replace an existing store?",
            f"{path} already exists and was not written by napari-tbsn: it may be your data.\n\n"
            "Replace it with the denoised result? Its contents will be deleted.",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel, QMessageBox.StandardButton.Cancel)
        return answer == QMessageBox.StandardButton.Yes

    def _fit(self, then_denoise: bool) -> None:
        settings = self._read_settings(writes_result=then_denoise)
        if settings is None:
            return
        denoiser = self._denoiser_for_fit(settings)
        self.loss_plot.clear()
        self._fit_headline = ""
        if denoiser.model is not None:  # Fit continues from the model held: say so, and how to start afresh
            self._say(f"fine-tuning the {self._model_origin or 'current'} model on this layer (Reset starts from "
                      "scratch)")
        else:
            self._say("fitting a new model: the progress bar shows the time left; Stop keeps the best weights")

        fit = FitRequest(settings.iterations, settings.time_budget,
                         settings.student if then_denoise or settings.student == "on" else "off")
        self._run_job(settings, denoiser, fit, then_denoise, "TBSN fit & denoise" if then_denoise else "TBSN fit")

    def _run_job(self, settings: JobSettings, denoiser: Denoiser, fit: FitRequest | None, denoise: bool,
                 description: str) -> None:
        """The core job (jobs.run_job) on the chosen layers: results become layers as each is done."""
        images = [JobImage(layer.name, lambda layer=layer: (layer_data(layer), settings.axes, layer))
                  for layer in settings.layers]
        destination = _Layers(settings) if denoise else None

        def job(stops, threads):
            return (yield from run_job(denoiser, images, stops, fit=fit, destination=destination, threads=threads))

        def done(summary: JobSummary) -> None:
            if summary.stopped:
                kept = "; the fitted model is kept" if fit is not None else ""
                self._say(f"stopped: {len(summary.done)} of {len(images)} layer(s) denoised{kept}")
            elif denoise and len(images) > 1 and not summary.failed:
                self._say(f"added {len(summary.done)} denoised layers")
            elif summary.failed and len(summary.failed) < len(images):  # the others went on: name the failed ones
                self._say("; ".join(f"'{report.name}': {report.message}" for report in summary.failed), error=True)

        self._job_fits, self._job_layers = fit is not None, len(images)
        self._start(job, description, done, settings.threads)

    def _on_fitted(self, denoiser: Denoiser, student_choice: str | None = None) -> None:
        self.denoiser, self._model_origin = denoiser, "fitted"
        self.noise_plot.show_model(denoiser.noise_model, denoiser.noise_measurement)
        if denoiser.summary is not None:
            student = f"\nstudent: {denoiser.student.summary.describe()}" if denoiser.student is not None else ""
            choice = f"\nstudent: {student_choice}" if student_choice else ""  # what auto chose, and why
            headline = denoiser.summary.headline()
            self._fit_headline = headline[:1].upper() + headline[1:]
            self._say("Denoise to see the result; Details for the loss and the noise model",
                      details=f"fit: {denoiser.summary.describe()}{student}{choice}\n{denoiser.describe_noise()}")

    # -- denoise -----------------------------------------------------------------------
    @staticmethod
    def _predict_job(denoiser: Denoiser, settings: JobSettings, data, cancel, threads: int):
        """(denoised, uncertainty or None); runs in the worker, on the settings read before.
        With a result file the result is written there (atomically) and shown from it, lazily."""
        # A fixed pattern measured on the stack rules the posterior out (camera.py): no uncertainty then.
        wants_uncertainty = settings.uncertainty and uses_posterior(denoiser.model, settings.options) \
            and not denoiser.model.camera.get("pattern")
        with contextlib.ExitStack() as stack:
            if settings.result_file is None:
                out = output_array(tuple(data.shape))
            else:
                # The layer's scale goes into the OME-Zarr metadata.
                like = ImageFile(data, settings.axes, "napari", {"ome": {"scale": [float(v) for v in settings.layer.scale]}})
                out = stack.enter_context(open_output(settings.result_file, tuple(data.shape), settings.axes, like=like,
                                                      inputs=settings.sources, replace=settings.replace_result))
            uncertainty = output_array(tuple(data.shape), beside=settings.result_file) if wants_uncertainty else None
            yield from denoiser.predict_iter(data, settings.axes, out=out, uncertainty=uncertainty,
                                             options=settings.options, cancel=cancel, threads=threads)
        if settings.result_file is not None:
            out = read_image(settings.result_file).data
        elif settings.same_type and np.dtype(data.dtype) != out.dtype:
            out = in_type_of(out, data.dtype)
        limits = contrast_limits(out), None if uncertainty is None else contrast_limits(uncertainty)
        return out, uncertainty, denoiser.quality, describe_model(denoiser.model, settings.options), limits

    def _job_settings(self, writes_result: bool = True) -> tuple[JobSettings, Denoiser] | None:
        if self.denoiser is None:
            self._say("no model yet: press Fit (or Load model) first", error=True)
            return None
        settings = self._read_settings(writes_result)
        return None if settings is None else (settings, self.denoiser)

    def _on_denoise(self) -> None:
        chosen = self._job_settings()
        if chosen is not None:
            settings, denoiser = chosen
            self._run_job(settings, denoiser, None, True, "TBSN denoise")

    def _add_result(self, layer, result, name: str | None = None, translate=None) -> None:
        if result is None:
            self._say("denoise stopped")
            return
        out, uncertainty, quality, model, limits = result
        replace = name is not None  # a new preview replaces the last one
        name = name or f"{layer.name} (TBSN)"
        add_result_layer(self.viewer, layer, out, name, limits[0], translate, replace=replace)
        if uncertainty is not None:
            add_result_layer(self.viewer, layer, uncertainty, f"{name} uncertainty", limits[1], translate,
                             colormap="magma", replace=replace)
        estimate = f"; {quality.describe()}" if quality is not None else ""
        self._say(f"added '{name}' ({np.dtype(out.dtype).name})"
                  + (" and its uncertainty (posterior SD)" if uncertainty is not None else "")
                  + f", denoised by {model}{estimate}")

    # -- preview -----------------------------------------------------------------------
    def _on_preview(self) -> None:
        chosen = self._job_settings(writes_result=False)
        if chosen is None:
            return
        settings, denoiser = chosen
        layer = settings.layer
        layout = PlaneLayout.of(settings.data.shape, settings.axes)
        plane, translate = shown_plane(self.viewer, layer, layout)
        selection, keep = layout.context_window(plane, denoiser.context_planes)
        block = settings.data[selection]
        # A quick look: no x8, and never into the result file.
        quick = dataclasses.replace(settings, options=settings.options.replace(ensemble=1), result_file=None)

        def cut(result):
            denoised, uncertainty, quality, model, limits = result
            return denoised[keep], None if uncertainty is None else uncertainty[keep], quality, model, limits

        def job(stops, threads):
            return (yield from self._predict_job(denoiser, quick, block, stops.cancel, threads))

        self._start(job, "TBSN preview",
                    lambda result: self._add_result(layer, cut(result), name=f"{layer.name} (TBSN preview)",
                                                    translate=translate), settings.threads)

    # -- model files -------------------------------------------------------------------
    def save_model(self, path: str | Path) -> Path:
        if self.denoiser is None:
            raise ValueError("nothing to save yet: Fit a model first")
        saved = self.denoiser.save(path)
        self._say(f"saved the model to {saved}")
        return saved

    def load_model(self, path: str | Path) -> Denoiser:
        self.denoiser = Denoiser.load(path, device=self.form.device_select.value)
        self._model_origin, self._fit_headline = "loaded", ""
        self.noise_plot.show_model(self.denoiser.noise_model, self.denoiser.noise_measurement)
        self.form.show_model(self.denoiser.preset, self.denoiser.pd, self.denoiser.noise_model)
        self._say(f"loaded {Path(path).name}: Denoise with it, or Fit to fine-tune it on this layer")
        return self.denoiser

    def _on_save(self) -> None:
        self._with_file(QFileDialog.getSaveFileName(self, "Save TBSN model", "tbsn_model.safetensors", MODEL_FILES),
                        self.save_model)

    def _on_load(self) -> None:
        self._with_file(QFileDialog.getOpenFileName(self, "Load TBSN model", "", MODEL_FILES), self.load_model)

    def export_model(self, path: str | Path) -> None:
        """Export the student as a BioImage Model Zoo package, in a worker (TorchScript and the
        package's validation take seconds to minutes); the status line says when it is done."""
        if self.denoiser is None:
            raise ValueError("nothing to export yet: press Fit (or Load model) first")
        denoiser, settings = self.denoiser, None
        if denoiser.student is None:  # zoo tools run the student: offer to distil one now
            settings = self._read_settings(writes_result=False)
            if settings is None:
                return
            if not self.confirm_distil(settings):
                self._say("Export needs a distilled student: press Export again and choose Distil, or set "
                          "student to 'on' before Fit")
                return

        def job(stops, threads):
            if settings is not None:
                yield from denoiser.distil_iter(settings.data, settings.axes, settings.iterations,
                                                settings.time_budget, cancel=stops.cancel,
                                                stop_training=stops.stop_training, threads=threads)
                if stops.cancel.is_set():
                    raise Cancelled("the distillation was stopped; nothing was exported")
            return denoiser.export_bioimageio(path)

        def done(exported) -> None:
            if settings is not None:
                self._on_fitted(denoiser)  # the model now holds its student
            self._say(f"exported the student to {exported} (BioImage Model Zoo format)")

        self._start(job, "TBSN export" if settings is None else "TBSN distil & export", done,
                    "auto" if settings is None else settings.threads)

    def confirm_distil(self, settings: JobSettings) -> bool:
        """Ask whether to distil a student now (on the chosen layer, with the time set), so
        that Export can go on."""
        budget = (f"{settings.time_budget:g} s" if settings.time_budget else f"{settings.iterations} iterations")
        answer = QMessageBox.question(
            self, "Distil a student first?",
            "Zoo tools (deepImageJ, ilastik, bioimageio.core) run a small student network distilled from the "
            f"fitted one. This model has none yet.\n\nDistil one now on '{settings.layer.name}' ({budget}), "
            "then export? Progress shows below; Stop cancels.",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel, QMessageBox.StandardButton.Yes)
        return answer == QMessageBox.StandardButton.Yes

    def _on_export(self) -> None:
        self._with_file(QFileDialog.getSaveFileName(self, "Export to the BioImage Model Zoo", "tbsn.bioimageio.zip",
                                                    ZOO_FILES), self.export_model)

    def _with_file(self, chosen: tuple[str, str], action) -> None:
        if chosen[0]:
            try:
                action(chosen[0])
            except Exception as error:
                if not is_user_error(error):
                    raise
                self._say(one_line(error), error=True)
