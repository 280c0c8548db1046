"""The "TBSN Denoise" dock widget: a thin layer over the Denoiser facade.

Fitting and denoising run in napari generator thread workers that yield progress, so the
viewer stays responsive; the widget only collects settings, shows progress and adds layers.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, LineEdit, SpinBox
from qtpy.QtWidgets import QFileDialog, QGridLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from ..axes import AXIS_LETTERS, PlaneLayout, guess_axes, parse_axes
from ..config import FIT_PRESETS, PRESET_HINTS
from ..denoiser import Denoiser, PredictionCancelled, PredictProgress
from ..devices import available_devices, resolve_device
from ..noise import NoiseModel
from ..training import FitProgress
from .loss_plot import LossPlot
from .noise_plot import NoisePlot

if TYPE_CHECKING:
    import napari

IN_MEMORY_LIMIT = 2 * 1024**3  # larger results go to a temporary memory-mapped file
# Workers still running, kept alive until they finish: a stopped fit still fits its variance
# head (seconds), and a worker whose widget was closed and collected would otherwise lose the
# Qt object its last signals go through.
_RUNNING_WORKERS: set = set()
PROGRESS_STEPS = 1000


def layer_axes(layer) -> str:
    """Axes for a layer: its axis labels when they are STCZYX letters, else a guess."""
    shape = tuple(_layer_data(layer).shape)
    labels = [str(label).upper() for label in getattr(layer, "axis_labels", ()) or ()]
    if len(labels) == len(shape) and all(len(a) == 1 and a in AXIS_LETTERS for a in labels):
        try:
            return parse_axes("".join(labels), len(shape))
        except ValueError:
            pass
    return guess_axes(shape, rgb=bool(getattr(layer, "rgb", False)))


def _layer_data(layer):
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def _format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s"


@dataclasses.dataclass(frozen=True)
class _Failure:
    message: str


class DenoiseWidget(QWidget):
    """Pick an image layer, fit a TBSN on it, denoise it into a new layer."""

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.denoiser: Denoiser | None = None
        self._pending: Denoiser | None = None  # the denoiser of a fit in progress
        self._worker = None
        self._activity = None
        self._activity_done = 0

        self.layer_select = ComboBox(label="image layer", choices=self._image_layers, nullable=True)
        self.axes = LineEdit(label="axes", tooltip="one letter per dimension from STCZYX, e.g. ZYX or TYX")
        self.preset_select = ComboBox(
            label="network", choices=[(PRESET_HINTS[name], name) for name in ("tiny", "small", "paper")], value="small"
        )
        self.iterations = SpinBox(label="iterations", min=0, max=10_000_000, step=100, value=0,
                                  tooltip="0: stop by the time budget instead")
        self.time_budget = FloatSpinBox(label="time budget (s)", min=0, max=1e7, step=30, value=120,
                                        tooltip="0: stop by the iterations instead")
        self.patch_size = SpinBox(label="patch size", min=64, max=1024, step=64,
                                  value=FIT_PRESETS["small"].patch_size,
                                  tooltip="training patch size in pixels (a multiple of 64)")
        self.pd = ComboBox(
            label="pd factor", choices=[("auto (measure the noise)", "auto")] + [(str(n), n) for n in range(1, 9)],
            value="auto", tooltip="auto: measured from the data; 1 for pixel-independent noise; "
            "2-5 for spatially correlated noise",
        )
        self.estimator = ComboBox(
            label="output", choices=[("posterior (noise model)", "posterior"), ("blind-spot mean", "blind_spot")],
            value="posterior", tooltip="posterior: folds the noisy pixel back in with the fitted noise model "
            "(pixel-independent noise); blind-spot mean: the network's prediction alone",
        )
        self.context = ComboBox(
            label="stack context", choices=[("auto (1 for Z-stacks)", "auto"), ("0 (each plane alone)", 0),
                                            ("1 plane each side", 1), ("2 planes each side", 2)],
            value="auto", tooltip="neighbouring Z (else T) planes the network sees beside the plane it denoises",
        )
        self.camera_gain = FloatSpinBox(
            label="camera gain", min=0, max=1e6, step=0.1, value=0,
            tooltip="calibrated noise model: image units per detected photon (e.g. ADU per electron); "
            "0 with read noise 0: estimate the noise from the data",
        )
        self.read_noise = FloatSpinBox(label="read noise", min=0, max=1e6, step=0.1, value=0,
                                       tooltip="calibrated noise model: read-noise standard deviation in image units")
        self.baseline = FloatSpinBox(label="camera baseline", min=-1e9, max=1e9, step=1, value=0,
                                     tooltip="calibrated noise model: the value of a pixel that detected nothing")
        self.uncertainty = CheckBox(label="uncertainty layer", value=False,
                                    tooltip="also add the posterior standard deviation as a layer")
        self.device_select = ComboBox(
            label="device", choices=[("auto", "auto")] + [(name, device) for device, name in available_devices()],
            value="auto",
        )
        self.settings = Container(widgets=[
            self.layer_select, self.axes, self.preset_select, self.iterations, self.time_budget,
            self.patch_size, self.pd, self.context, self.estimator, self.camera_gain, self.read_noise, self.baseline,
            self.uncertainty, self.device_select,
        ])

        self.fit_button = QPushButton("Fit")
        self.stop_button = QPushButton("Stop")
        self.denoise_button = QPushButton("Denoise")
        self.fit_denoise_button = QPushButton("Fit && Denoise")
        self.preview_button = QPushButton("Preview slice")
        self.save_button = QPushButton("Save model…")
        self.load_button = QPushButton("Load model…")
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, PROGRESS_STEPS)
        self.progress_bar.setFormat("idle")
        self.progress_bar.setTextVisible(True)
        self.status = QLabel("pick a noisy image layer, then Fit")
        self.status.setWordWrap(True)
        self.loss_plot = LossPlot()
        self.noise_plot = NoisePlot()

        buttons = QGridLayout()
        for index, button in enumerate([
            self.fit_button, self.stop_button, self.denoise_button, self.fit_denoise_button,
            self.preview_button, self.save_button, self.load_button,
        ]):
            buttons.addWidget(button, index // 2, index % 2)
        layout = QVBoxLayout(self)
        layout.addWidget(self.settings.native)
        layout.addLayout(buttons)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status)
        layout.addWidget(self.loss_plot)
        layout.addWidget(self.noise_plot)
        layout.addStretch(1)

        self.fit_button.clicked.connect(self._on_fit)
        self.stop_button.clicked.connect(self.stop)
        self.denoise_button.clicked.connect(self._on_denoise)
        self.fit_denoise_button.clicked.connect(self._on_fit_denoise)
        self.preview_button.clicked.connect(self._on_preview)
        self.save_button.clicked.connect(self._on_save)
        self.load_button.clicked.connect(self._on_load)
        self.layer_select.changed.connect(self._on_layer_changed)
        self.preset_select.changed.connect(self._on_preset_changed)
        for event in ("removed", "reordered"):
            getattr(viewer.layers.events, event).connect(self._refresh_layers)
        viewer.layers.events.inserted.connect(self._on_layer_inserted)
        # Closing the widget or the viewer stops a running fit or denoise.
        self._closed = False
        # Not a bound method: PyQt drops those before a dying object's own destroyed signal.
        self.destroyed.connect(lambda *_: self._on_destroyed())
        self._set_busy(False)
        self._refresh_layers()
        self._on_layer_changed(self.layer_select.value)

    def _on_destroyed(self, *_: Any) -> None:
        # The Qt side is gone: stop the work, and let late worker signals find nothing to update.
        self._closed = True
        self.stop()

    # -- layers ------------------------------------------------------------------------
    def _image_layers(self, *_: Any) -> list:
        from napari.layers import Image

        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

    def _refresh_layers(self, *_: Any) -> None:
        self.layer_select.reset_choices()
        if self.layer_select.value is None and self.layer_select.choices:
            self.layer_select.value = self.layer_select.choices[-1]

    def _on_layer_inserted(self, event) -> None:
        """A newly opened image is the one the user most likely wants next."""
        from napari.layers import Image

        self.layer_select.reset_choices()
        if isinstance(event.value, Image) and not self.busy and not event.value.name.endswith("(TBSN)") \
                and not event.value.name.endswith("(TBSN preview)"):
            self.layer_select.value = event.value

    def _on_preset_changed(self, preset: str) -> None:
        self.patch_size.value = FIT_PRESETS[preset].patch_size

    def _on_layer_changed(self, layer) -> None:
        if layer is not None:
            self.axes.value = layer_axes(layer)

    # -- state -------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """True while a fit or a denoise runs."""
        return self._worker is not None

    def _set_busy(self, busy: bool) -> None:
        for button in (self.fit_button, self.denoise_button, self.fit_denoise_button, self.preview_button,
                       self.save_button, self.load_button):
            button.setEnabled(not busy)
        self.stop_button.setEnabled(busy)
        self.settings.enabled = not busy

    def _say(self, message: str) -> None:
        self.status.setText(message)

    def _error(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self._say(message)
        show_error(message)

    def _selected(self) -> tuple[Any, Any, str]:
        """(layer, data, axes) for the chosen layer, validated; raises ValueError with the fix."""
        layer = self.layer_select.value
        if layer is None:
            raise ValueError("no image layer chosen: open or pick a noisy image first")
        data = _layer_data(layer)
        axes = parse_axes(self.axes.value, len(data.shape))
        return layer, data, axes

    def _denoiser_for_fit(self) -> Denoiser:
        preset, pd, device = self.preset_select.value, self.pd.value, self.device_select.value
        context = self.context.value
        fit_config = dataclasses.replace(FIT_PRESETS[preset], patch_size=int(self.patch_size.value))
        noise_model = self._camera_noise()
        current = self.denoiser
        if (current is not None and current.network is not None and current.preset == preset
                and pd in ("auto", current.pd) and context in ("auto", current.context_planes)):
            current.device = resolve_device(device)  # fine-tune the fitted or loaded model
            current.fit_config = fit_config
            current.given_noise_model = noise_model or current.given_noise_model
            return current
        return Denoiser(preset=preset, pd=pd, device=device, estimator=self.estimator.value, fit_config=fit_config,
                        context=context, noise_model=noise_model)

    def _camera_noise(self) -> NoiseModel | None:
        """The calibrated noise model the user typed in, or None to estimate it from the data."""
        gain, read_noise = float(self.camera_gain.value), float(self.read_noise.value)
        if gain == 0 and read_noise == 0:
            return None
        return NoiseModel.from_camera(gain, read_noise, float(self.baseline.value))

    # -- running work ------------------------------------------------------------------
    def _start(self, job, description: str, on_done) -> None:
        from napari.qt.threading import create_worker
        from napari.utils import progress
        from napari.utils.notifications import notification_manager

        def guarded():
            # Bad input found while working (NaN pixels, out of memory...) comes back as a
            # message for the user, not as a crash; anything unexpected still propagates.
            try:
                return (yield from job())
            except (ValueError, TypeError, MemoryError, FloatingPointError) as error:
                return _Failure(str(error))

        def finish(result) -> None:
            if self._closed:
                return
            if isinstance(result, _Failure):
                self._error(result.message)
            else:
                on_done(result)

        self._activity = progress(total=PROGRESS_STEPS, desc=description)
        self._activity_done = 0
        worker = create_worker(guarded, _start_thread=False)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(finish)
        worker.errored.connect(lambda error: None if self._closed else self._say(f"error: {error}"))
        # Warnings raised in the worker (a calibration that misses the data, correlated noise at
        # pd 1) become napari notifications. napari 0.9's worker means to relay them itself, but
        # its relaying mixin's __init__ never runs (QRunnable's __init__ ends the chain); the
        # manager drops a warning it has already shown, so a fixed napari shows it once.
        worker.warned.connect(lambda warning: notification_manager.receive_warning(*warning))
        worker.finished.connect(self._on_finished)
        _RUNNING_WORKERS.add(worker)
        worker.finished.connect(lambda: _RUNNING_WORKERS.discard(worker))
        self._worker = worker
        self._set_busy(True)
        self.progress_bar.setFormat(f"{description}…")
        worker.start()

    def _on_progress(self, item) -> None:
        if self._closed:
            return
        if isinstance(item, FitProgress):
            self.loss_plot.add(item.iteration, item.loss, item.validation_loss)
            best = "" if item.best_validation_loss is None else f", best val {item.best_validation_loss:.4g}"
            text = f"fit: iteration {item.iteration}, loss {item.loss:.4g}{best}, ETA {_format_seconds(item.eta)}"
        elif isinstance(item, PredictProgress):
            text = f"denoise: plane {item.plane + 1}/{item.planes}, ETA {_format_seconds(item.eta)}"
        else:
            return
        steps = int(round(item.fraction * PROGRESS_STEPS))
        self.progress_bar.setValue(steps)
        self.progress_bar.setFormat(text)
        if self._activity is not None and steps > self._activity_done:
            self._activity.update(steps - self._activity_done)
            self._activity_done = steps

    def _on_finished(self) -> None:
        self._worker = None
        if self._activity is not None:
            self._activity.close()
            self._activity = None
        if self._closed:
            return
        self.progress_bar.setFormat("idle")
        self._set_busy(False)

    def stop(self) -> None:
        """Stop the running fit (keeping its best weights) or denoise."""
        for denoiser in (self.denoiser, self._pending):
            if denoiser is not None:
                denoiser.cancel()

    # -- fit ---------------------------------------------------------------------------
    def _fit_settings(self) -> dict[str, Any]:
        iterations = int(self.iterations.value) or None
        budget = float(self.time_budget.value) or None
        if iterations is None and budget is None:
            iterations = FIT_PRESETS[self.preset_select.value].default_iterations
        return {"iterations": iterations, "time_budget": budget}

    def _on_fit(self) -> None:
        self._fit(then_denoise=False)

    def _on_fit_denoise(self) -> None:
        self._fit(then_denoise=True)

    def _fit(self, then_denoise: bool) -> None:
        try:
            layer, data, axes = self._selected()
            denoiser = self._denoiser_for_fit()
        except (ValueError, TypeError) as error:
            self._error(str(error))
            return
        settings = self._fit_settings()
        self._pending = denoiser
        self.loss_plot.clear()

        def job():
            yield from denoiser.fit_iter(data, axes, **settings)
            if not then_denoise:
                return denoiser
            if denoiser.summary is not None and denoiser.summary.stopped_early:
                return denoiser, None  # Stop pressed: keep the model, skip the denoise
            return denoiser, (yield from self._predict_job(denoiser, data, axes))

        def done(result) -> None:
            if not then_denoise:
                self._on_fitted(result)
                return
            self._on_fitted(result[0])
            self._add_result(layer, result[1])

        self._start(job, "TBSN fit & denoise" if then_denoise else "TBSN fit", done)

    def _on_fitted(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser
        self._pending = None
        self.noise_plot.show_model(denoiser.noise_model, denoiser.noise_measurement)
        summary = denoiser.summary
        if summary is not None:
            stopped = " (stopped)" if summary.stopped_early else ""
            self._say(f"fitted{stopped}: {summary.iterations} iterations in {_format_seconds(summary.seconds)}, "
                      f"best validation loss {summary.best_validation_loss:.4g}\n{denoiser.describe_noise()}")

    # -- denoise -----------------------------------------------------------------------
    def _output_array(self, shape: tuple[int, ...]):
        if np.prod(shape, dtype=np.int64) * 4 <= IN_MEMORY_LIMIT:
            return np.empty(shape, dtype=np.float32)
        folder = Path(tempfile.mkdtemp(prefix="napari-tbsn-"))
        return np.lib.format.open_memmap(folder / "denoised.npy", mode="w+", dtype=np.float32, shape=shape)

    def _predict_job(self, denoiser: Denoiser, data, axes: str, ensemble: int | str = "auto"):
        """(denoised, uncertainty or None), or None when stopped."""
        denoiser.estimator = self.estimator.value
        out = self._output_array(tuple(data.shape))
        uncertainty = None
        if self.uncertainty.value and denoiser.uses_posterior:
            uncertainty = self._output_array(tuple(data.shape))
        try:
            yield from denoiser.predict_iter(data, axes, out=out, uncertainty=uncertainty, ensemble=ensemble)
        except PredictionCancelled:
            return None
        return out, uncertainty

    def _fitted(self) -> Denoiser:
        if self.denoiser is None or not self.denoiser.is_fitted:
            raise ValueError("no model yet: press Fit (or Load model) first")
        return self.denoiser

    def _on_denoise(self) -> None:
        try:
            layer, data, axes = self._selected()
            denoiser = self._fitted()
        except (ValueError, TypeError) as error:
            self._error(str(error))
            return
        self._start(lambda: (yield from self._predict_job(denoiser, data, axes)), "TBSN denoise",
                    lambda out: self._add_result(layer, out))

    def _add_result(self, layer, result, name: str | None = None, translate=None) -> None:
        if result is None:
            self._say("denoise stopped")
            return
        out, uncertainty = result
        replace = name is not None  # a new preview replaces the last one
        name = name or f"{layer.name} (TBSN)"
        self._add_layer(layer, out, name, translate, replace=replace)
        if uncertainty is not None:
            self._add_layer(layer, uncertainty, f"{name} uncertainty", translate, colormap="magma", replace=replace)
        quality = self.denoiser.quality if self.denoiser is not None else None
        estimate = f"; {quality.describe()}" if quality is not None else ""
        self._say(f"added '{name}'" + (" and its uncertainty (posterior SD)" if uncertainty is not None else "")
                  + estimate)

    def _add_layer(
        self, layer, out, name: str, translate=None, colormap: str | None = None, replace: bool = False
    ) -> None:
        sample = np.asarray(out[tuple(slice(None, None, max(1, s // 256)) for s in out.shape)])
        low, high = np.percentile(sample, [0.5, 99.9]) if sample.size else (0.0, 1.0)
        kwargs: dict[str, Any] = {
            "name": name,
            "scale": layer.scale,
            "translate": layer.translate if translate is None else translate,
            "contrast_limits": (float(low), float(max(high, low + 1e-6))),
            "colormap": colormap or layer.colormap.name,
            "blending": layer.blending,
            "rgb": layer.rgb,
        }
        if getattr(layer, "axis_labels", None) is not None:
            kwargs["axis_labels"] = layer.axis_labels
        if getattr(layer, "units", None) is not None:
            kwargs["units"] = layer.units
        if replace and name in self.viewer.layers:
            self.viewer.layers.remove(name)
        self.viewer.add_image(out, **kwargs)

    # -- preview -----------------------------------------------------------------------
    def current_plane(self, layer, axes: str) -> tuple[int, ...]:
        """The data index of every S/T/Z axis at the slice shown in the viewer."""
        layout = PlaneLayout.of(_layer_data(layer).shape, axes)
        point = np.asarray(self.viewer.dims.point[-layer.ndim:], dtype=float)
        data_point = (point - np.asarray(layer.translate)) / np.asarray(layer.scale)
        return tuple(
            int(np.clip(round(data_point[axis]), 0, layout.shape[axis] - 1)) for axis in layout.plane_axes
        )

    def _on_preview(self) -> None:
        try:
            layer, data, axes = self._selected()
            denoiser = self._fitted()
            layout = PlaneLayout.of(data.shape, axes)
            plane = self.current_plane(layer, axes)
        except (ValueError, TypeError) as error:
            self._error(str(error))
            return
        # One plane thick, except along the context axis of a model that sees neighbouring
        # planes: those are read too (clipped at the stack ends, where predict mirrors them
        # the same way) and the shown plane is cut out of the result.
        letter = layout.context_axis if denoiser.context_planes else None
        context_axis = None if letter is None else layout.axes.index(letter)
        selection: list[Any] = [slice(None)] * len(data.shape)
        keep: list[Any] = [slice(None)] * len(data.shape)
        for axis, index in zip(layout.plane_axes, plane):
            selection[axis] = slice(index, index + 1)
            if axis == context_axis:
                first = max(index - denoiser.context_planes, 0)
                selection[axis] = slice(first, min(index + denoiser.context_planes + 1, layout.shape[axis]))
                keep[axis] = slice(index - first, index - first + 1)
        block = data[tuple(selection)]
        translate = np.asarray(layer.translate, dtype=float).copy()
        for axis, index in zip(layout.plane_axes, plane):
            translate[axis] += index * layer.scale[axis]

        def shown_plane(result):
            if result is None:  # stopped
                return None
            denoised, uncertainty = result
            return denoised[tuple(keep)], None if uncertainty is None else uncertainty[tuple(keep)]

        # A quick look: no x8 ensemble.
        self._start(lambda: (yield from self._predict_job(denoiser, block, axes, ensemble=1)), "TBSN preview",
                    lambda out: self._add_result(layer, shown_plane(out), name=f"{layer.name} (TBSN preview)",
                                                 translate=translate))

    # -- model files -------------------------------------------------------------------
    def save_model(self, path: str | Path) -> Path:
        if self.denoiser is None or not self.denoiser.is_fitted:
            raise ValueError("nothing to save yet: Fit a model first")
        saved = self.denoiser.save(path)
        self._say(f"saved the model to {saved}")
        return saved

    def load_model(self, path: str | Path) -> Denoiser:
        self.denoiser = Denoiser.load(path, device=self.device_select.value)
        self.noise_plot.show_model(self.denoiser.noise_model, self.denoiser.noise_measurement)
        self.preset_select.value = self.denoiser.preset
        self.pd.value = self.denoiser.pd
        self._say(f"loaded {Path(path).name}: Denoise with it, or Fit to fine-tune it on this layer")
        return self.denoiser

    def _on_save(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save TBSN model", "tbsn_model.safetensors",
                                              "TBSN model (*.safetensors)")
        if path:
            try:
                self.save_model(path)
            except (ValueError, OSError) as error:
                self._error(str(error))

    def _on_load(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load TBSN model", "", "TBSN model (*.safetensors)")
        if path:
            try:
                self.load_model(path)
            except (ValueError, OSError) as error:
                self._error(str(error))

