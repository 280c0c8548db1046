"""Camera effects (camera.py): found where they are and not where they are not, taken out
exactly blind through the whole predict path."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from napari_tbsn import Calibration, Denoiser, PredictOptions
from napari_tbsn.axes import PlaneLayout
from napari_tbsn.camera import (CameraCorrection, CorrectedStack, find_correction, remeasured, remove_line_offsets,
                                 replace_hot)
from napari_tbsn.errors import BadInput
from napari_tbsn.progress import drive

from .conftest import noisy_image

HOT = [(10, 12), (30, 41), (47, 20), (52, 52)]
PERTURBATION = 40.0


def camera_stack(planes: int = 12, shape=(64, 256), rows: float = 1.0, offsets: float = 2.0, hot: float = 80.0,
                 seed: int = 0, drifting: bool = False, with_rows: bool = False) -> tuple[np.ndarray, ...]:
    """(clean, recorded): synthetic cells through a camera with per-pixel offsets, hot pixels at
    HOT and per-frame row offsets (all in photons, baseline 100). The cells are new in every
    plane, or where `drifting` the same cells moving a pixel a plane (a Z-stack's structure, which
    changes slowly from plane to plane). `with_rows`: the row offsets (planes, rows) too."""
    if drifting:
        cells = noisy_image((shape[0], shape[1] + planes), seed=seed)[0]
        clean = np.stack([cells[:, plane: plane + shape[1]] for plane in range(planes)]) + 100
    else:
        clean = np.stack([noisy_image(shape, seed=seed + plane)[0] for plane in range(planes)]) + 100
    rng = np.random.default_rng(seed)
    pattern = rng.normal(0, offsets, shape)
    for y, x in HOT:
        pattern[y, x] += hot
    recorded = rng.poisson(clean - 100) + 100 + pattern + rng.normal(0, 1, clean.shape)
    row_offsets = rng.normal(0, rows, (planes, shape[0], 1))
    recorded = (recorded + row_offsets).astype(np.float32)
    return (clean, recorded, row_offsets[..., 0]) if with_rows else (clean, recorded)


def test_a_stacks_fixed_pattern_hot_pixels_and_row_offsets_are_found():
    _, stack = camera_stack()
    correction = find_correction(stack, PlaneLayout.of(stack.shape, "ZYX"))
    assert correction.pattern is not None, correction.describe()
    assert all(correction.hot[0][y, x] for y, x in HOT), correction.describe()
    assert correction.hot.sum() <= 3 * len(HOT)
    assert correction.lines == ("rows",), correction.describe()
    assert "hot" in correction.describe() and "rows" in correction.describe()


def test_a_single_images_hot_pixels_are_found():
    _, stack = camera_stack(planes=1, rows=0.0)
    correction = find_correction(stack[0], PlaneLayout.of(stack.shape[1:], "YX"))
    assert correction.pattern is None  # one frame shows no pattern: it is noise there
    assert sorted(zip(*np.nonzero(correction.hot[0]))) == HOT
    assert not correction.lines


@pytest.mark.parametrize("axes", ["YX", "ZYX"])
def test_nothing_is_found_in_poisson_gaussian_data(axes):
    shape = (64, 96) if axes == "YX" else (12, 64, 96)
    noisy = np.stack([noisy_image(shape[-2:], seed=s)[1] for s in range(shape[0])]) if axes == "ZYX" else \
        noisy_image(shape)[1]
    correction = find_correction(noisy, PlaneLayout.of(noisy.shape, axes))
    assert not correction.active, correction.describe()


def test_taking_the_camera_out_brings_the_data_close_to_its_clean_version():
    clean, stack = camera_stack()
    layout = PlaneLayout.of(stack.shape, "ZYX")
    view = CorrectedStack(stack, layout, find_correction(stack, layout))
    corrected = np.stack([layout.read_plane(view, (z,))[0] for z in range(len(stack))])
    assert np.mean((corrected - clean) ** 2) < 0.5 * np.mean((stack - clean) ** 2)
    assert abs(np.mean(corrected - clean)) < 0.2  # the baseline stays


def test_dark_frames_give_offsets_read_variance_and_unusable_pixels():
    rng = np.random.default_rng(3)
    offsets = 100 + rng.normal(0, 2, (64, 64))
    sigma = np.full((64, 64), 1.5)
    sigma[5, 7] = 12.0  # a very noisy pixel
    dark = offsets + sigma * rng.standard_normal((40, 64, 64))
    calibration = Calibration.from_dark(dark)
    assert np.abs(calibration.offset - offsets)[sigma < 2].max() < 1.5  # 6 sd of a 40-frame mean
    layout = PlaneLayout.of((3, 64, 64), "ZYX")
    correction = find_correction(np.zeros((3, 64, 64), np.float32) + offsets.astype(np.float32), layout, calibration)
    assert correction.hot[0, 5, 7] and correction.hot.sum() == 1
    # The very noisy pixel is never used, so no pixel carries a large extra read variance.
    assert correction.extra_variance[0].max() < 3 and abs(np.median(calibration.variance) - 2.25) < 0.3
    with pytest.raises(BadInput, match="dark frames are 64x64 pixels but the image is 32x64"):
        find_correction(np.zeros((3, 32, 64), np.float32), PlaneLayout.of((3, 32, 64), "ZYX"), calibration)
    with pytest.raises(BadInput, match="frames, Y, X"):
        Calibration.from_dark(np.zeros((2, 2, 8, 8)))


def test_hot_pixels_in_the_dark_frames_do_not_shift_the_corrected_baseline():
    rng = np.random.default_rng(4)
    offsets = 100 + rng.normal(0, 2, (64, 64))
    hot = rng.random((64, 64)) < 0.02  # a dark current of 150 counts: 3 counts on the mean of all pixels
    dark = offsets + rng.poisson(150 * hot, (40, 64, 64)) + rng.normal(0, 1.5, (40, 64, 64))
    layout = PlaneLayout.of((2, 64, 64), "ZYX")
    stack = (offsets + 150 * hot + 5.0).astype(np.float32)[None].repeat(2, axis=0)  # 5 counts of signal
    for frames in (dark, dark[0]):  # a single frame tells hot pixels by their offset alone
        correction = find_correction(stack, layout, Calibration.from_dark(frames))
        corrected = CorrectedStack(stack, layout, correction).read_plane((0,))[0]
        assert abs(np.mean(corrected[~hot]) - 105.0) < 0.1  # the usable pixels' baseline: 100 counts
    assert correction.hot is None  # one frame marks no pixel unusable (no variance to tell)


def _other_lattice_pixels(shape, y, x):
    """A mask of the pixels off (y, x)'s lattice: the ones a blind network at (y, x) sees."""
    mask = np.ones(shape, dtype=bool)
    mask[y % 2 :: 2, x % 2 :: 2] = False
    return mask


@pytest.mark.parametrize("offset", [(0, 2), (2, 2), (0, 1), (1, 1), (2, 0)])
def test_hot_pixels_are_replaced_from_their_own_lattice_only(offset):
    _, stack = camera_stack(planes=1)
    image = stack[0].astype(np.float64)
    hot = np.zeros(image.shape, dtype=bool)
    hot[30, 41] = True
    y, x = 30 + offset[0], 41 + offset[1]
    before, after = image.copy(), image.copy()
    after[y, x] += PERTURBATION
    replace_hot(before, hot)
    replace_hot(after, hot)
    seen = _other_lattice_pixels(image.shape, y, x)
    assert np.array_equal(before[seen], after[seen])


@pytest.mark.parametrize("direction", ["rows", "columns"])
def test_line_offsets_are_measured_on_each_pixels_own_lattice(direction):
    _, stack = camera_stack(planes=1)
    image = stack[0].astype(np.float64)
    for y, x in [(20, 20), (21, 33), (0, 1)]:
        line = (y, slice(x % 2, None, 2)) if direction == "rows" else (slice(y % 2, None, 2), x)
        for where in ((y, x), line):  # the pixel alone; its whole line on its own lattice
            before, after = image.copy(), image.copy()
            after[where] += PERTURBATION
            remove_line_offsets(before, direction, 0.8)
            remove_line_offsets(after, direction, 0.8)
            seen = _other_lattice_pixels(image.shape, y, x)
            assert np.array_equal(before[seen], after[seen]), (y, x, where)
        # The line's offset moved by the perturbation and was taken out: its own lattice reads it.
        assert np.allclose((after - before)[line], 0.2 * PERTURBATION, atol=1e-9)


def _camera_model(context: int, line: str = "", far: bool = False):
    """A tiny model with random weights, a variance head, a noise model and a lattice filter
    (its residuals centred along `line`, none read on the far ring where `far`)."""
    from napari_tbsn import TBSN
    from napari_tbsn.config import network_preset
    from napari_tbsn.lattice import LatticeFilter
    from napari_tbsn.model import FittedModel
    from napari_tbsn.noise import NoiseModel
    from napari_tbsn.normalization import Normalizer

    torch.manual_seed(0)
    network = TBSN(network_preset("tiny", 1, variance_head=True, context_channels=2 * context)).eval()
    with torch.no_grad():
        for param in network.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    lattice = LatticeFilter(((0.3, 0.15, 0.15, 0.05, 0.05, 0.2, -0.1, 0.1, -0.05, 0.05),), prior_scale=(0.8,),
                            line=line, far=far)
    return FittedModel(network, Normalizer((100.0,), (120.0,)), pd=1, preset="tiny",
                       noise_model=NoiseModel.from_camera(1.0, 2.0, 100.0), lattice_filter=lattice,
                       camera={"mode": "auto", "found": []})


def _predict(model, options, data, layout, correction):
    from napari_tbsn.prediction import predict_planes

    out = np.zeros(layout.shape, dtype=np.float32)
    spread = np.zeros(layout.shape, dtype=np.float32) if options.estimator == "posterior" else None
    drive(predict_planes(model, options, torch.device("cpu"), data, layout, out, spread, threading.Event(),
                         correction))
    return out, spread


def _own_outputs_that_moved(stack, layout, correction, estimator, probes, remeasure=True, line=""):
    """Perturb y_p at each probe (z, y, x) alone and predict again (with the correction's
    decisions kept, its maps measured again): the probes whose own output moved. A hot pixel's
    value must change nothing at all; elsewhere the perturbation must be seen around p. The
    posterior folds y_p back in on purpose: there its standard deviation must not move, and
    its estimate must move by less than the perturbation."""
    model = _camera_model(context=1, line=line)
    options = PredictOptions(estimator=estimator, ensemble=1, tile_size=64)
    before, before_spread = _predict(model, options, stack, layout, correction)
    leaks = []
    for z, y, x in probes:
        changed = stack.copy()
        changed[z, y, x] += PERTURBATION
        again = remeasured(correction, changed, layout) if remeasure else correction
        after, after_spread = _predict(model, options, changed, layout, again)
        if correction.hot is not None and correction.hot[0, y, x]:
            assert np.array_equal(after, before), (z, y, x)
            continue
        assert np.abs(after - before).max() > 1e-3, "the perturbation must be seen around it"
        if line:  # the filter runs: p's lattice neighbour reads p (the network there cannot)
            below = y + 2 if y + 2 < stack.shape[1] else y - 2
            assert after[z, below, x] != before[z, below, x], (z, y, x)
        if estimator == "posterior":
            moved = (after[z, y, x] - before[z, y, x]) / PERTURBATION
            if after_spread[z, y, x] != before_spread[z, y, x] or not 0 < moved < 1:
                leaks.append(((z, y, x), float(moved)))
        elif after[z, y, x] != before[z, y, x]:
            leaks.append(((z, y, x), float(after[z, y, x] - before[z, y, x])))
    return leaks


# Next to a hot pixel (30, 41) at odd and even offsets, two hot pixels themselves, and elsewhere.
PROBES = [(3, 30 + dy, 41 + dx) for dy, dx in [(0, 1), (0, 2), (1, 1), (2, 2), (2, 0)]] + \
    [(4, 10, 12), (4, 52, 52), (2, 20, 33), (5, 47, 21)]


# With row offsets the lattice filter reads residuals centred along the rows, or is off (a filter
# fitted without them).
# Drifting: the row offsets measured against the planes around.
@pytest.mark.parametrize("rows, line, drifting", [(1.0, "rows", False), (1.0, "", False), (0.0, "", False),
                                                  (0.5, "rows", True)])
def test_the_camera_correction_is_exactly_blind_through_the_whole_prediction(rows, line, drifting):
    """A fixed pattern, hot pixels and row offsets found in the stack: perturbing y_p at plane z
    never moves output p at plane z (the blind-spot mean: the output where a pattern is
    measured on the stack)."""
    _, stack = camera_stack(planes=8, rows=rows, drifting=drifting)
    layout = PlaneLayout.of(stack.shape, "ZYX")
    correction = find_correction(stack, layout)
    assert correction.pattern is not None and correction.hot is not None
    assert bool(correction.lines) == (rows > 0), correction.describe()
    if drifting:  # chosen on 12 such planes with dark frames (test_a_stack_whose_structure_drifts_...), not always here
        correction = dataclasses.replace(correction, lines_across=True)
    leaks = _own_outputs_that_moved(stack, layout, correction, "blind_spot", PROBES, line=line)
    assert not leaks, f"pixels whose own output moved with their own value: {leaks}"


@pytest.mark.parametrize("rows, estimator, drifting", [(1.0, "blind_spot", False), (1.0, "posterior", False),
                                                       (0.0, "posterior", False), (0.5, "posterior", True)])
def test_a_calibrated_prediction_is_exactly_blind(rows, estimator, drifting):  # the lattice filter centred along rows
    """Dark-frame maps (offsets, per-pixel read variance, unusable pixels), with row offsets
    found in the data (within each plane, or against the planes around) or none, through the
    whole path, the posterior included."""
    _, stack = camera_stack(planes=6, rows=rows, drifting=drifting)
    layout = PlaneLayout.of(stack.shape, "ZYX")
    correction = find_correction(stack, layout, Calibration.from_dark(_dark_frames()))
    assert all(correction.hot[0][y, x] for y, x in HOT) and bool(correction.lines) == (rows > 0)
    if drifting:
        correction = dataclasses.replace(correction, lines_across=True)
    leaks = _own_outputs_that_moved(stack, layout, correction, estimator, PROBES, remeasure=False,
                                    line="rows" if rows else "")
    assert not leaks, f"pixels whose own output moved with their own value: {leaks}"


@pytest.mark.parametrize("drifting", [True, False])
def test_a_stack_whose_structure_drifts_measures_its_line_offsets_against_the_planes_around(drifting, tmp_path):
    """The same cells from plane to plane (dark frames given: the choice measured on the rows
    alone): each row's offset is told from its structure by the same rows of the planes around,
    and these estimates are closer to the true offsets than the ones within each plane. New
    cells in every plane: within each plane."""
    _, stack, true_rows = camera_stack(planes=12, rows=0.5, drifting=drifting, with_rows=True)
    layout = PlaneLayout.of(stack.shape, "ZYX")
    correction = find_correction(stack, layout, Calibration.from_dark(_dark_frames()))
    assert correction.lines == ("rows",) and correction.lines_across == drifting, correction.describe()
    correction.save(tmp_path / "camera.npz")  # a cluster task's correction
    assert CameraCorrection.load(tmp_path / "camera.npz").lines_across == drifting
    if not drifting:
        return
    left = {}  # the error of the row offsets taken out of each plane predicted and of its context planes
    for name, found in (("across", correction), ("within", dataclasses.replace(correction, lines_across=False))):
        errors = []
        for z in range(12):
            planes = [z, *(plane[0] for plane in layout.context_planes((z,), 1))]
            unlined = CorrectedStack(stack, layout, dataclasses.replace(found, lines=()))
            taken = unlined.read_plane_with_context((z,), 1) - CorrectedStack(stack, layout, found).read_plane_with_context((z,), 1)
            error = np.median(taken, axis=2) - true_rows[planes]
            errors.append(error - error.mean(axis=1, keepdims=True))
        left[name] = float(np.std(errors))
    assert left["across"] < 0.8 * left["within"], left


def _dark_frames(shape=(64, 256)):
    """30 dark frames of camera_stack's camera, as far as a calibration tells it: offsets and read noise."""
    rng = np.random.default_rng(5)
    dark = 100 + rng.normal(0, 2, (1, *shape)) + rng.normal(0, 1.5, (30, *shape))
    for y, x in HOT:
        dark[:, y, x] += rng.normal(0, 15, 30)  # hot pixels: their dark current's shot noise
    return dark


@pytest.mark.parametrize("dark", [False, True])
def test_line_offsets_measured_across_planes_never_read_the_plane_predicted(dark):
    """Predicting plane z, with line offsets measured against the planes around: whatever y_p
    is (alone, or with its whole row on its own lattice), the plane's pixels off p's lattice and
    every pixel of its context planes read the same, also where the reader kept what it measured
    for another plane. The planes around are read (their values move what a prediction of the
    next plane reads), plane z only for the row's level on p's own lattice."""
    _, stack = camera_stack(planes=12, rows=0.5, drifting=True)
    layout = PlaneLayout.of(stack.shape, "ZYX")
    correction = find_correction(stack, layout, Calibration.from_dark(_dark_frames()) if dark else None)
    assert correction.lines, correction.describe()
    correction = dataclasses.replace(correction, lines_across=True)
    unchanged = CorrectedStack(stack, layout, correction)
    for z in (0, 1, 6, 11):
        near = z + 1 if z < 11 else z - 1  # a plane of the other half: the other hot decisions and map
        for y, x in [(20, 20), (21, 33), (0, 1)]:
            for where in ((y, x), (y, slice(x % 2, None, 2))):
                changed = stack.copy()
                changed[z][where] += PERTURBATION
                again = CorrectedStack(changed, layout, correction if dark else remeasured(correction, changed, layout))
                beside = again.read_plane_with_context((near,), 2)  # what it keeps must not leak into z's
                before, after = unchanged.read_plane_with_context((z,), 2), again.read_plane_with_context((z,), 2)
                seen = _other_lattice_pixels(stack.shape[1:], y, x)
                assert np.array_equal(before[0][seen], after[0][seen]), (z, y, x, where)
                assert np.array_equal(before[1:], after[1:]), (z, y, x, where)
                if where != (y, x):  # not vacuous: the row's shift was taken out as its offset on p's lattice ...
                    assert np.allclose(before[0][where], after[0][where], atol=1e-3), (z, y, x)
                    # ... and the next plane's prediction reads plane z
                    moved = np.abs(beside[0] - unchanged.read_plane_with_context((near,), 2)[0])
                    assert moved.max() > 0.1, (z, y, x)


def test_fit_and_predict_say_what_was_found_and_files_keep_it(tmp_path):
    _, stack = camera_stack(planes=8)
    assert Denoiser().camera == "auto"  # the default: decisions never read the plane predicted
    denoiser = Denoiser(preset="tiny", device="cpu").fit(stack, "ZYX", iterations=3)
    assert "hot" in denoiser.summary.camera and "rows" in denoiser.summary.describe()
    assert denoiser.lattice_filter.line == "rows"  # it reads residuals centred along the rows
    path = denoiser.save(tmp_path / "model.safetensors")
    loaded = Denoiser.load(path, device="cpu")
    assert loaded.camera == "auto" and loaded.model.camera["mode"] == "auto"
    assert np.array_equal(loaded.predict(stack, "ZYX"), denoiser.predict(stack, "ZYX"))
    off = Denoiser(preset="tiny", device="cpu", camera="off").fit(stack, "ZYX", iterations=3)
    assert off.summary.camera is None
    assert Denoiser.load(off.save(tmp_path / "off.safetensors"), device="cpu").camera == "off"
    with pytest.raises(BadInput, match="camera must be"):
        Denoiser(camera="dark")


def test_both_halves_of_any_stack_are_sampled_and_a_small_stacks_context_leaves_no_nan():
    from napari_tbsn.camera import PATTERN_PLANES, _sampled_planes

    for count in (8, 9, 127, 128, 253, 1000):
        picks = _sampled_planes(count)
        even = [flat for flat in picks if flat % 2 == 0]
        odd = len(picks) - len(even)
        assert (len(even), odd) == (min(PATTERN_PLANES // 2, (count + 1) // 2), min(PATTERN_PLANES // 2, count // 2))
    _, stack = camera_stack(planes=8, rows=0.0)
    pattern = find_correction(stack, PlaneLayout.of(stack.shape, "ZYX")).pattern
    target, context = pattern.maps_for(4, {flat: stack[flat][np.newaxis] for flat in range(8)})
    assert np.isfinite(target).all() and np.isfinite(context).all()


def test_with_pd_above_1_hot_pixels_and_line_offsets_stay_in():
    _, stack = camera_stack(planes=8)
    correction = find_correction(stack, PlaneLayout.of(stack.shape, "ZYX"))
    assert correction.hot is not None and correction.lines
    shuffled = correction.for_pd(2)
    assert shuffled.hot is None and not shuffled.lines and shuffled.pattern is correction.pattern
    assert "pd 2" in shuffled.describe() and correction.for_pd(1) is correction


def test_a_student_is_distilled_on_the_data_without_the_camera(tmp_path):
    _, stack = camera_stack(planes=8)
    denoiser = Denoiser(preset="tiny", device="cpu", camera="auto").fit(stack, "ZYX", iterations=2)
    denoiser.distil(stack, "ZYX", iterations=2)
    assert denoiser.model.student is not None
    assert np.isfinite(denoiser.predict(stack, "ZYX")).all()


@pytest.mark.parametrize("planes", [12, 4])  # the stack's halves decide; a few planes, plane by plane
def test_a_planes_own_values_never_decide_its_hot_pixels(planes):
    """Which pixels are hot for predicting plane z (what its context planes show there, and what
    the posterior never uses) is decided without plane z: raising y_p in plane z far enough to
    look hot changes no decision for z. (Given the decisions, every value is exactly blind:
    test_the_camera_correction_is_exactly_blind_through_the_whole_prediction.)"""
    _, stack = camera_stack(planes=planes, rows=0.0)
    layout = PlaneLayout.of(stack.shape, "ZYX")
    correction = find_correction(stack, layout)
    assert correction.hot is not None and (correction.hot_halves is not None) == (planes == 12)

    def decisions(found, z):
        hot = found.hot_for(z)
        return np.zeros(stack.shape[1:], dtype=bool) if hot is None else hot[0]

    for z in range(planes):
        for y, x in [(30, 43), (12, 100), (47, 20)]:  # beside a hot pixel, anywhere, a hot pixel
            changed = stack.copy()
            changed[z, y, x] += 500.0  # as bright as a hot pixel, in plane z only
            again = find_correction(changed, layout)
            assert np.array_equal(decisions(again, z), decisions(correction, z)), (z, y, x)
        lowered = stack.copy()  # a hot pixel looking ordinary in plane z alone stays hot for z
        lowered[z, 30, 41] = np.median(stack[z, 28:33:2, 39:44:2])
        assert decisions(find_correction(lowered, layout), z)[30, 41] and decisions(correction, z)[30, 41]
    # Not vacuous: a pixel as bright in every plane is hot for z.
    changed = stack.copy()
    changed[:, 12, 100] += 500.0
    assert decisions(find_correction(changed, layout), 0)[12, 100]


@pytest.mark.parametrize("planes", [12, 4, 1])
def test_a_saved_correction_loads_as_it_was(tmp_path, planes):
    """Cluster tasks read the client's correction from a file: every field comes back."""
    _, stack = camera_stack(planes=planes)
    stack = stack[0] if planes == 1 else stack
    correction = find_correction(stack, PlaneLayout.of(stack.shape, "YX" if planes == 1 else "ZYX"))
    assert correction.hot is not None
    correction.save(tmp_path / "camera.npz")
    loaded = CameraCorrection.load(tmp_path / "camera.npz")
    assert loaded.digest() == correction.digest() and loaded.lines == correction.lines
    for target in range(planes):
        assert np.array_equal(loaded.hot_for(target), correction.hot_for(target))


def test_a_pattern_measured_with_another_kernel_size_is_remeasured_with_its_own(monkeypatch, tmp_path):
    """A correction measured before the predictor's reach changed keeps its kernels when it is
    summed again (what a blindness test perturbs) or saved and loaded (a cluster task's)."""
    from napari_tbsn import camera

    _, stack = camera_stack(planes=12, rows=0.0)
    layout = PlaneLayout.of(stack.shape, "ZYX")
    monkeypatch.setattr(camera, "PREDICTOR_REACH", 2)
    older = find_correction(stack, layout)
    monkeypatch.undo()
    assert older.pattern is not None and older.pattern.kernels.shape[-1] == 5
    again = remeasured(older, stack, layout)
    assert np.array_equal(again.pattern.kernels, older.pattern.kernels)
    assert np.allclose(again.pattern.sums, older.pattern.sums)
    older.save(tmp_path / "camera.npz")
    loaded = camera.CameraCorrection.load(tmp_path / "camera.npz")
    raw = {flat: stack[flat][np.newaxis] for flat in (2, 3, 4)}
    for before, after in zip(older.pattern.maps_for(3, raw), loaded.pattern.maps_for(3, raw)):
        assert np.array_equal(before, after)
    assert find_correction(stack, layout).pattern.kernels.shape[-1] == 2 * camera.PREDICTOR_REACH + 1


@pytest.mark.parametrize("height", [8, 10, 16])
@pytest.mark.parametrize("offsets", [0.0, 2.0])
def test_a_thin_stack_finds_its_pattern_and_nothing_else(height, offsets):
    """A plane a few pixels high fits a smaller kernel (with 11x11 on 8 rows the kernel had more
    weights than pixels to fit, and took the structure for pattern) and looks for no row offsets
    (on 10 or 16 rows, structure agreed as offsets would)."""
    from napari_tbsn.camera import predictor_reach

    shape = (height, 256)
    clean = np.stack([noisy_image(shape, seed=plane)[0] for plane in range(16)]) + 100
    rng = np.random.default_rng(0)
    stack = (rng.poisson(clean - 100) + 100 + rng.normal(0, offsets, shape) + rng.normal(0, 1, clean.shape))
    correction = find_correction(stack.astype(np.float32), PlaneLayout.of(stack.shape, "ZYX"))
    assert not correction.lines and (correction.pattern is not None) == (offsets > 0), correction.describe()
    if correction.pattern is not None:
        reach = predictor_reach(*shape)
        assert 0 < reach < 5 and not correction.pattern.kernels[..., : 5 - reach, :].any()


def test_a_single_image_fits_a_lattice_filter_that_reads_no_far_ring():
    """On one image pixel q's hot decision reads q's far lattice ring (4 pixels away), and the
    lattice filter at p reads q only where that ring does not hold p: a far filter."""
    _, stack = camera_stack(planes=1, rows=0.0)
    image = stack[0]
    denoiser = Denoiser(preset="tiny", device="cpu").fit(image, "YX", iterations=2)
    assert "hot" in denoiser.summary.camera and denoiser.lattice_filter.far
    off = Denoiser(preset="tiny", device="cpu", camera="off").fit(image, "YX", iterations=2).lattice_filter
    assert off is not None and not off.far  # nothing decides on the image: the whole filter
    assert not Denoiser(preset="tiny", device="cpu").fit(stack[:1].repeat(4, 0), "ZYX", iterations=2).lattice_filter.far


def _hot_with(image, layout, pixel, value) -> bool:
    changed = image.copy()
    changed[pixel] = value
    return bool(find_correction(changed, layout).hot[0][pixel])


def test_the_far_ring_never_reads_the_nearest_ring_not_even_at_the_edges():
    """Mirrored past an edge, the ring 4 pixels away must land on the pixel itself or 4 pixels
    away, never 2 (a whole image mirrored by 4 pixels would): checked at every pixel of small images."""
    from napari_tbsn.camera import lattice_median, second_brightest_neighbour

    rng = np.random.default_rng(3)
    for shape in [(12, 14), (7, 9), (3, 4)]:
        image = rng.normal(size=shape)
        before = [lattice_median(image, 4), second_brightest_neighbour(image, 4)]
        for y, x in np.ndindex(*shape):
            changed = image.copy()
            changed[y, x] += 50.0
            after = [lattice_median(changed, 4), second_brightest_neighbour(changed, 4)]
            for dy, dx in [(dy, dx) for dy in (-2, 0, 2) for dx in (-2, 0, 2) if dy or dx]:
                if 0 <= y + dy < shape[0] and 0 <= x + dx < shape[1]:
                    assert all(a[y + dy, x + dx] == b[y + dy, x + dx] for a, b in zip(after, before)), \
                        (shape, y, x, dy, dx)


def test_a_prediction_of_a_single_image_never_reads_the_far_ring():
    """A model whose filter reads the far ring (fitted on a stack, or with the camera off) reads
    none of it where the predicted image decides its own hot pixels: the rule is the setting's
    and the layout's, not what is found."""
    from napari_tbsn.prediction import as_predicted

    model = _camera_model(context=0)
    single, stack = PlaneLayout.of((64, 256), "YX"), PlaneLayout.of((4, 64, 256), "ZYX")
    assert as_predicted(model, "auto", single).lattice_filter.far
    assert as_predicted(model, "auto", stack) is model and as_predicted(model, "off", single) is model
    _, recorded = camera_stack(planes=1, rows=0.0)
    denoiser = Denoiser(preset="tiny", device="cpu", context=0).fit(recorded[:1].repeat(4, 0), "ZYX", iterations=2)
    assert not denoiser.lattice_filter.far
    far = Denoiser.from_model(dataclasses.replace(denoiser.model, lattice_filter=dataclasses.replace(
        denoiser.lattice_filter, far=True)), camera="auto")
    assert np.array_equal(denoiser.predict(recorded[0], "YX"), far.predict(recorded[0], "YX"))


def test_a_single_images_hot_pixel_decisions_never_read_the_nearest_lattice_ring():
    """What the lattice filter at p reads of a hot decision must not hold p: a hot pixel stays
    hot, and a pixel beside it stays usable, whatever its 8 nearest lattice neighbours read."""
    _, stack = camera_stack(planes=1, rows=0.0)
    layout = PlaneLayout.of(stack[0].shape, "YX")
    before = find_correction(stack[0], layout).hot[0]
    assert all(before[y, x] for y, x in HOT)
    y, x = HOT[1]
    for dy, dx in [(dy, dx) for dy in (-2, 0, 2) for dx in (-2, 0, 2) if dy or dx]:
        for value in (-500.0, 2000.0):
            changed = stack[0].copy()
            changed[y + dy, x + dx] += value
            after = find_correction(changed, layout).hot[0]
            assert after[y, x], (dy, dx, value)  # the hot pixel stays hot
            ring = [(y + dy + a, x + dx + b) for a in (-2, 0, 2) for b in (-2, 0, 2) if a or b]
            assert all(after[q] == before[q] for q in ring), (dy, dx, value)


@pytest.mark.parametrize("rows", [1.0, 0.0])
def test_a_single_image_deciding_its_own_hot_pixels_is_exactly_blind_through_the_filter(rows):
    """A single image: hot pixels (and row offsets) decided on the image itself, again after each
    perturbation; a far lattice filter (centred along the rows where they are taken out)."""
    _, stack = camera_stack(planes=1, rows=rows)
    image = stack[0]
    layout = PlaneLayout.of(image.shape, "YX")
    model = _camera_model(context=0, line="rows" if rows else "", far=True)
    options = PredictOptions(estimator="blind_spot", ensemble=1, tile_size=64)
    correction = find_correction(image, layout)
    assert correction.decided_on_itself and bool(correction.lines) == (rows > 0), correction.describe()
    before, _ = _predict(model, options, image, layout, correction)
    y, x = HOT[1]
    probes = [(y + dy, x + dx) for dy, dx in [(0, 2), (2, 2), (0, 4), (4, 4), (4, 0), (-4, 4), (2, 0)]] + [(20, 100)]
    # A pixel that is only just hot beside a bright far-ring neighbour: raising another of its
    # far-ring neighbours (p, 4 pixels away) makes it usable again. The filter at p must not read it.
    image, (qy, qx) = image.copy(), (40, 150)
    image[qy, qx + 4] += 60.0
    base = image[qy, qx]
    image[qy, qx] = base + next(h for h in np.arange(0.0, 400.0, 1.0)
                                if _hot_with(image, layout, (qy, qx), base + h))
    flips = (qy + 4, qx)
    changed = image.copy()
    changed[flips] += 1000.0
    assert find_correction(image, layout).hot[0][qy, qx] and not find_correction(changed, layout).hot[0][qy, qx]
    correction = dataclasses.replace(correction, hot=find_correction(image, layout).hot)
    before, _ = _predict(model, options, image, layout, correction)
    # The whole filter reads q, 4 pixels from p: p's output moves with the decision y_p flips.
    whole = _camera_model(context=0, line="rows" if rows else "")
    again = dataclasses.replace(correction, hot=find_correction(changed, layout).hot)
    assert _predict(whole, options, changed, layout, again)[0][flips] != _predict(whole, options, image, layout,
                                                                                   correction)[0][flips]
    for py, px in [*probes, flips]:
        for value in (PERTURBATION, 1000.0):
            changed = image.copy()
            changed[py, px] += value
            # The hot pixels decided again; the line offsets' weights, like the normalisation, are
            # statistics of the whole image and stay.
            again = dataclasses.replace(correction, hot=find_correction(changed, layout).hot)
            after, _ = _predict(model, options, changed, layout, again)
            assert after[py, px] == before[py, px], (py, px, value)
            assert after[py + 2, px] != before[py + 2, px], (py, px)  # the filter reads p there


def test_an_uncertainty_map_that_a_measured_pattern_rules_out_is_refused_before_the_fit(tmp_path, capsys,
                                                                                        monkeypatch):
    import tifffile

    from napari_tbsn import denoiser as facade
    from napari_tbsn.cli import main

    def no_fit(*args, **kwargs):
        raise AssertionError("the fit ran")

    monkeypatch.setattr(facade, "fit_model", no_fit)
    _, stack = camera_stack(planes=12)
    tifffile.imwrite(tmp_path / "in.tif", stack, metadata={"axes": "ZYX"})
    assert main(["denoise", str(tmp_path / "in.tif"), "-o", str(tmp_path / "out.tif"), "--uncertainty",
                 str(tmp_path / "sd.tif"), "--preset", "tiny", "--iterations", "500", "--quiet"]) == 2
    assert "uncertainty map needs the posterior" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


def test_lattice_medians_at_a_few_pixels_are_the_median_filters():
    from napari_tbsn.camera import lattice_median, with_lattice_medians

    image = np.random.default_rng(3).normal(0, 1, (37, 50))
    where = np.zeros(image.shape, dtype=bool)
    where[[0, 1, 5, 36, 20, 36], [0, 49, 7, 49, 25, 0]] = True  # corners and edges: the mirrored ring
    expected = np.where(where, lattice_median(image), image)
    assert np.array_equal(with_lattice_medians(image, where), expected)


# 600 rows: three strips; 257 and 514: a last strip of 1 and 2 rows
@pytest.mark.parametrize("shape", [(3, 3), (7, 10), (64, 65), (600, 37), (257, 9), (514, 7)])
def test_lattice_order_statistics_equal_scipys_filters(shape):
    """The sorting network and the running top two give scipy's median_filter and rank_filter on
    the lattice ring exactly, ties (integer counts) and mirrored edges included."""
    import itertools

    from scipy.ndimage import median_filter, rank_filter

    from napari_tbsn.camera import _LATTICE_RING, _SORT_8, lattice_median, second_brightest_neighbour

    for bits in itertools.product((0, 1), repeat=8):  # a network that sorts every 0/1 input sorts all (zero-one principle)
        values = list(bits)
        for low, high in _SORT_8:
            values[low], values[high] = min(values[low], values[high]), max(values[low], values[high])
        assert values == sorted(bits)
    rng = np.random.default_rng(sum(shape))
    for image in (rng.normal(size=shape), rng.poisson(3.0, shape).astype(np.float64)):
        np.testing.assert_array_equal(lattice_median(image), median_filter(image, footprint=_LATTICE_RING, mode="mirror"))
        np.testing.assert_array_equal(second_brightest_neighbour(image),
                                      rank_filter(image, -2, footprint=_LATTICE_RING, mode="mirror"))
