"""The widget's settings: the fields a user fills in, and one frozen snapshot of them.

`SettingsForm.read()` runs on the GUI thread, before a worker starts, and returns a
`JobSettings` that the worker uses without touching Qt. The expert fields (camera noise
model, patch size, pd, tile size) sit in an "Advanced" section, folded by default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from magicgui.widgets import (CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, LineEdit, PushButton, Select,
                              SpinBox)

from ..axes import AXIS_LETTERS, guess_axes, parse_axes
from ..config import FIT_PRESETS, PRESET_HINTS, FitConfig, PredictOptions, student_option
from ..devices import available_devices
from ..noise import NoiseModel
from ..camera import Calibration
from ..image_io import output_bytes, read_image
from ..outputs import ReplaceRefused, check_not_input, check_output, check_room, source_paths
from . import results


def layer_data(layer):
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def layer_sources(layer) -> tuple[Path, ...]:
    """The files or stores a layer was opened from or reads from: a result file may touch none."""
    paths = []
    source = getattr(getattr(layer, "source", None), "path", None)
    if source:
        paths.append(Path(source))
    levels = layer.data if getattr(layer, "multiscale", False) else [layer.data]
    for level in levels:
        paths.extend(source_paths(level))
    return tuple(dict.fromkeys(paths))


def layer_axes(layer) -> str:
    """Axes for a layer: its axis labels when they are STCZYX letters, else a guess."""
    shape = tuple(layer_data(layer).shape)
    labels = [str(label).upper() for label in getattr(layer, "axis_labels", ()) or ()]
    if len(labels) == len(shape) and all(len(a) == 1 and a in AXIS_LETTERS for a in labels):
        try:
            return parse_axes("".join(labels), len(shape))
        except ValueError:
            pass
    return guess_axes(shape, rgb=bool(getattr(layer, "rgb", False)))


@dataclass(frozen=True)
class JobSettings:
    """Everything a fit or denoise job needs from the form, read on the GUI thread."""

    layer: Any
    data: Any
    axes: str
    preset: str
    pd: int | str
    context: int | str
    device: str
    iterations: int | None
    time_budget: float | None
    fit_config: FitConfig
    noise_model: NoiseModel | None
    options: PredictOptions
    uncertainty: bool
    student: str = "auto"  # distil a student UNet after the fit: "auto", "on" or "off"
    result_file: Path | None = None  # an .ome.zarr the result is written to, and shown from
    replace_result: bool = False  # the user said yes to replacing a store napari-tbsn did not write
    sources: tuple[Path, ...] = ()  # the files the layer reads from, which no output may touch
    channels: str = "auto"  # multichannel images: "auto", "joint" or "independent"
    threads: int | str = "auto"  # torch's CPU threads; "auto": the free cores less one for the viewer
    same_type: bool = False  # give the result the input's type (rounded, clipped) instead of float32
    camera: str | Calibration = "auto"  # "auto", "off", or dark frames' calibration (camera.py)
    more_layers: tuple = ()  # further layers (same axes) that Fit fits on and Denoise denoises too

    @property
    def layers(self) -> tuple:
        """Every layer the job fits on or denoises: the chosen layer first."""
        return (self.layer, *self.more_layers)

    def for_layer(self, layer) -> "JobSettings":
        """These settings for one of the layers (its data; a result file only for the first)."""
        if layer is self.layer:
            return self
        return dataclasses.replace(self, layer=layer, data=layer_data(layer), result_file=None, more_layers=())


class SettingsForm(Container):
    """The settings fields, laid out by magicgui."""

    def __init__(self, image_layers) -> None:
        self.layer_select = ComboBox(label="image layer", choices=image_layers, nullable=True)
        self.more_layers = Select(
            label="more layers", choices=lambda *_: [layer for layer in image_layers()
                                                     if layer is not self.layer_select.value],
            tooltip="optional: more images of the same kind (same axes, same microscope): Fit fits one model on "
            "all of them, Denoise denoises each into a layer of its own (Ctrl-click to choose several)")
        self.axes = LineEdit(label="axes", tooltip="one letter per dimension from STCZYX, e.g. ZYX or TYX")
        self.preset_select = ComboBox(
            label="network", choices=[(PRESET_HINTS[name], name) for name in ("tiny", "small", "paper")], value="small")
        self.iterations = SpinBox(label="iterations", min=0, max=10_000_000, step=100, value=0,
                                  tooltip="0: stop by the time budget instead")
        self.time_budget = FloatSpinBox(label="time budget (s)", min=0, max=1e7, step=30, value=120,
                                        tooltip="0: stop by the iterations instead")
        self.context = ComboBox(
            label="stack context", choices=[("auto (1 for Z-stacks)", "auto"), ("0 (each plane alone)", 0),
                                            ("1 plane each side", 1), ("2 planes each side", 2)],
            value="auto", tooltip="neighbouring Z (else T) planes the network sees beside the plane it denoises")
        self.channels = ComboBox(
            label="channels", choices=[("auto (by their structures)", "auto"), ("joint", "joint"),
                                       ("independent", "independent")],
            value="auto", tooltip="multichannel images: joint: one network reads all channels (channels that show "
            "the same structures); independent: each channel denoised as a sample of one single-channel network "
            "(unrelated stains); auto: chosen by how well the channels' structures correlate")
        self.estimator = ComboBox(
            label="output", choices=[("posterior (noise model)", "posterior"), ("blind-spot mean", "blind_spot")],
            value="posterior", tooltip="posterior: folds the noisy pixel back in with the fitted noise model "
            "(pixel-independent noise); blind-spot mean: the network's prediction alone")
        self.uncertainty = CheckBox(label="uncertainty layer", value=False,
                                    tooltip="also add the posterior standard deviation as a layer (from the teacher: "
                                    "no student is distilled or used)")
        self.student = ComboBox(
            label="student", choices=[("auto (when it saves time)", "auto"), ("on", "on"), ("off", "off")],
            value="auto", tooltip="distil a fast UNet student from the fitted network and denoise with it; auto: "
            "when distilling and predicting with it takes less time than predicting with the fitted network "
            "(distillation adds a few minutes after the fit), and denoising with it only where its check on "
            "pixels it never trained on finds it no worse than the fitted network; on: always")
        self.result_file = FileEdit(
            label="result file", mode="w", filter="*.ome.zarr", value="",
            tooltip="optional: write the denoised stack to this .ome.zarr and show it from there (for stacks "
            "larger than memory; napari reads it lazily); empty: keep the result in memory")
        self.result_type = ComboBox(
            label="result type", choices=[("float32 (exact)", "float32"), ("same as the input", "same")],
            value="float32", tooltip="float32 keeps the denoised values exactly; 'same as the input' rounds and "
            "clips them into the input's type (e.g. uint16: half the memory). RGB images always keep their type.")
        self.device_select = ComboBox(
            label="device", choices=[("auto", "auto")] + [(name, device) for device, name in available_devices()],
            value="auto")
        self.show_advanced = PushButton(text="Advanced ▸")
        self.advanced = Container(widgets=self._advanced_fields(), visible=False)
        self.show_advanced.changed.connect(self._toggle_advanced)
        self.layer_select.changed.connect(self._on_layer_changed)
        self.preset_select.changed.connect(lambda preset: setattr(self.patch_size, "value",
                                                                  FIT_PRESETS[preset].patch_size))
        super().__init__(widgets=[
            self.layer_select, self.more_layers, self.axes, self.preset_select, self.iterations, self.time_budget, self.context,
            self.channels, self.estimator, self.uncertainty, self.student, self.result_file, self.result_type,
            self.device_select, self.show_advanced,
            self.advanced,
        ])

    def _advanced_fields(self) -> list:
        self.pd = ComboBox(
            label="pd factor", choices=[("auto (measure the noise)", "auto")] + [(str(n), n) for n in range(1, 9)],
            value="auto", tooltip="auto: measured from the data; 1 for pixel-independent noise; "
            "2-5 for spatially correlated noise")
        self.patch_size = SpinBox(label="patch size", min=64, max=1024, step=64, value=FIT_PRESETS["small"].patch_size,
                                  tooltip="training patch size in pixels (a multiple of 64)")
        self.tile_size = SpinBox(label="tile size", min=0, max=8192, step=64, value=0,
                                 tooltip="prediction tile size in pixels: smaller needs less memory; "
                                 "0: as large as a quarter of the free memory allows")
        self.camera_gain = FloatSpinBox(
            label="camera gain", min=0, max=1e6, step=0.1, value=0,
            tooltip="calibrated noise model: image units per detected photon (e.g. ADU per electron); "
            "0 with read noise 0: estimate the noise from the data")
        self.read_noise = FloatSpinBox(label="read noise", min=0, max=1e6, step=0.1, value=0,
                                       tooltip="calibrated noise model: read-noise standard deviation in image units")
        self.baseline = FloatSpinBox(label="camera baseline", min=-1e9, max=1e9, step=1, value=0,
                                     tooltip="calibrated noise model: the value of a pixel that detected nothing")
        self.camera = ComboBox(
            label="camera", choices=[("auto (find and take out)", "auto"), ("off (data as it is)", "off")],
            value="auto", tooltip="auto: find an sCMOS camera's fixed pattern, hot pixels and row or column offsets "
            "in the data and take them out before fitting and denoising; off: take the data as it is")
        self.dark_frames = FileEdit(
            label="dark frames", mode="r", filter="*.tif *.tiff *.npy *.zarr", value="",
            tooltip="optional: frames of the same camera with the shutter closed (frames x Y x X): per-pixel "
            "offsets and read noise from them instead of from the data")
        self.threads = SpinBox(label="CPU threads", min=0, max=1024, value=0,
                               tooltip="threads the fit and denoise use on the CPU; 0 (auto): the cores no other "
                               "program is busy on, less one that keeps napari responsive")
        return [self.pd, self.patch_size, self.tile_size, self.camera, self.dark_frames, self.camera_gain,
                self.read_noise, self.baseline, self.threads]

    def _on_layer_changed(self, layer) -> None:
        if layer is not None:
            self.axes.value = layer_axes(layer)
        self.more_layers.reset_choices()

    def _toggle_advanced(self, *_: Any) -> None:
        self.advanced.visible = not self.advanced.visible
        self.show_advanced.text = "Advanced ▾" if self.advanced.visible else "Advanced ▸"

    def camera_noise(self) -> NoiseModel | None:
        """The calibrated noise model typed in, or None (gain and read noise 0) to estimate it."""
        gain, read_noise = float(self.camera_gain.value), float(self.read_noise.value)
        if gain == 0 and read_noise == 0:
            return None
        return NoiseModel.from_camera(gain, read_noise, float(self.baseline.value))

    def camera_setting(self) -> str | Calibration:
        """The camera field, or the dark frames' calibration where a file is given."""
        text = str(self.dark_frames.value or "").strip()
        if text in ("", "."):
            return self.camera.value
        if self.camera.value == "off":
            raise ValueError("dark frames are given but the camera is set to off: choose auto, or clear the dark "
                             "frames field")
        path = Path(text).expanduser()
        if not path.exists():
            raise ValueError(f"the dark frames file {path} does not exist: pick the camera's dark frames again")
        return Calibration.from_dark(read_image(path).data)

    def read(self, confirm_replace: Callable[[Path], bool] | None = None, writes_result: bool = True) -> JobSettings:
        """A snapshot of the form, checked; raises ValueError (with the fix) on bad settings.
        `confirm_replace(path)` asks whether an existing store napari-tbsn did not write may
        be replaced by the result; without it, such a store is refused. `writes_result`: the
        job writes the result file, which is checked (room included); else it is left out."""
        layer = self.layer_select.value
        if layer is None:
            raise ValueError("no image layer chosen: open or pick a noisy image first")
        data = layer_data(layer)
        preset = self.preset_select.value
        iterations = int(self.iterations.value) or None
        budget = float(self.time_budget.value) or None
        if iterations is None and budget is None:
            iterations = FIT_PRESETS[preset].default_iterations
        sources = layer_sources(layer)
        dark = str(self.dark_frames.value or "").strip()
        if dark not in ("", "."):  # the dark frames are read too: no result may replace them
            sources = (*sources, Path(dark).expanduser().absolute())
        axes = parse_axes(self.axes.value, len(data.shape))
        more = tuple(other for other in self.more_layers.value if other is not layer)
        for other in more:
            if len(layer_data(other).shape) != len(axes) or bool(getattr(other, "rgb", False)) != \
                    bool(getattr(layer, "rgb", False)):
                raise ValueError(f"the layer '{other.name}' has {len(layer_data(other).shape)} dimensions, but "
                                 f"'{layer.name}' has axes {axes}: choose more layers of the same axes")
            sources = (*sources, *layer_sources(other))
        result_file, replace = self._result_file(sources, confirm_replace) if writes_result else (None, False)
        if result_file is not None and more:
            raise ValueError("the result file takes the denoised stack of one layer: clear it to denoise several "
                             "layers (each becomes a layer of its own), or choose no more layers")
        if result_file is not None:  # room for the result, and for a large uncertainty map beside it
            nbytes = output_bytes(tuple(data.shape))
            mapped = nbytes > results.IN_MEMORY_LIMIT and bool(self.uncertainty.value)
            check_room([(result_file, nbytes)] + ([(result_file.with_name(".uncertainty"), nbytes)] if mapped else []))
        elif writes_result:
            for each in (layer, *more):
                results.check_fits_in_memory(tuple(layer_data(each).shape))
        return JobSettings(
            layer=layer, data=data, axes=axes, preset=preset,
            pd=self.pd.value, context=self.context.value, device=self.device_select.value, iterations=iterations,
            time_budget=budget, fit_config=dataclasses.replace(FIT_PRESETS[preset], patch_size=int(self.patch_size.value)),
            noise_model=self.camera_noise(),
            options=PredictOptions(estimator=self.estimator.value, tile_size=int(self.tile_size.value) or "auto",
                                   student=student_option(self.student.value, bool(self.uncertainty.value))),
            uncertainty=bool(self.uncertainty.value),
            student="off" if self.uncertainty.value else self.student.value,
            result_file=result_file, replace_result=replace, sources=sources,
            channels=self.channels.value, threads=int(self.threads.value) or "auto",
            same_type=self.result_type.value == "same" or bool(getattr(layer, "rgb", False)),
            camera=self.camera_setting(), more_layers=more,
        )

    def _result_file(self, sources: tuple[Path, ...],
                     confirm_replace: Callable[[Path], bool] | None) -> tuple[Path | None, bool]:
        """The result file typed or picked, checked (None when the field is empty), and
        whether the user agreed to replace the store there."""
        text = str(self.result_file.value or "").strip()
        if text in ("", "."):
            return None, False
        path = Path(text).expanduser().absolute()
        check_not_input(path, sources, role="the result file")
        if not path.name.lower().endswith(".zarr"):
            raise ValueError(f"the result file {path.name} is not a zarr store: name it {path.stem}.ome.zarr")
        try:
            check_output(path, role="the result file")  # the sources were checked above
        except ReplaceRefused:
            if confirm_replace is None or not confirm_replace(path):
                raise
            return path, True
        return path, False

    def show_model(self, preset: str, pd: int, noise_model: NoiseModel | None) -> None:
        """Fill the fields from a loaded model, so that Fit fine-tunes it as it was fitted."""
        self.preset_select.value = preset
        self.pd.value = pd
        gain, read_noise, baseline = 0.0, 0.0, 0.0
        if noise_model is not None and noise_model.given:
            # The same variance line, gain * signal + offset, as gain, read noise and baseline.
            gain, offset = noise_model.gain[0], noise_model.offset[0]
            read_noise = offset**0.5 if offset >= 0 else 0.0
            baseline = -offset / gain if offset < 0 and gain > 0 else 0.0
        self.camera_gain.value, self.read_noise.value, self.baseline.value = gain, read_noise, baseline
