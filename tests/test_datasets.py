"""Datasets: one model fitted on many images, many images denoised with it (core, jobs, CLI)."""

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_tbsn import Denoiser
from napari_tbsn.cli import main
from napari_tbsn.errors import BadInput
from napari_tbsn.jobs import FitRequest, JobImage, run_job
from napari_tbsn.patches import PatchSampler
from napari_tbsn.progress import Stops, drive

from .conftest import noisy_image


def test_crops_come_from_every_image_by_its_pixels_and_never_touch_validation():
    rng = np.random.default_rng(0)
    small = np.zeros((1, 1, 64, 64), np.float32)
    large = np.ones((2, 1, 128, 96), np.float32)  # 6x the pixels of `small`
    sampler = PatchSampler([small, large], 32, 0.1, 100, rng)
    held = [int(h.sum()) for h in sampler.held_out]
    assert sum(held) == len(sampler.validation) == round(0.1 * (4 + 2 * 12))
    # Mark the held-out blocks in the planes themselves: no training crop may contain them.
    marked = [small.copy(), large.copy()]
    for group, mask in zip(marked, sampler.held_out):
        for n, r, c in zip(*np.nonzero(mask)):
            group[n, :, r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] = 7.0
    sampler.groups = marked
    batch = sampler.sample(rng, 4000)
    assert not np.any(batch == 7.0)
    share_large = float(np.mean(batch[:, 0, 0, 0] == 1.0))
    # Every crop position clear of validation equally likely, across the images: count them all.
    free = []
    for g, group in enumerate(marked):
        count, _, height, width = group.shape
        n, y, x = (axis.ravel() for axis in np.meshgrid(np.arange(count), np.arange(height - 31),
                                                        np.arange(width - 31), indexing="ij"))
        free.append(int((~sampler._overlaps_validation(g, n, y, x)).sum()))
    assert [sampler._free_positions(g) for g in range(2)] == free
    np.testing.assert_allclose(sampler._weights, np.array(free) / sum(free))
    assert share_large == pytest.approx(free[1] / sum(free), abs=0.02)
    assert sampler.training_pixels == 64 * 64 + 2 * 128 * 96 - sum(held) * 32 * 32


def test_an_image_held_out_whole_gives_no_crops():
    rng = np.random.default_rng(1)
    images = [np.full((1, 1, 64, 64), float(i), np.float32) for i in range(3)]  # one block each
    sampler = PatchSampler(images, 64, 0.1, 10, rng)
    held = [bool(h.any()) for h in sampler.held_out]
    assert sum(held) == 1
    values = set(sampler.sample(rng, 200)[:, 0, 0, 0].tolist())
    assert values == {float(i) for i in range(3) if not held[i]}


def test_one_model_fitted_on_images_of_different_sizes_records_them(tmp_path):
    _, first = noisy_image((64, 96), seed=1)
    _, second = noisy_image((2, 80, 64), seed=2)
    denoiser = Denoiser(preset="tiny", device="cpu").fit([(first, "YX"), (second, "ZYX")], iterations=3,
                                                          names=["a.tif", "b.tif"])
    model = denoiser.model
    assert [image["name"] for image in model.fitted_on] == ["a.tif", "b.tif"]
    assert [image["shape"] for image in model.fitted_on] == [[64, 96], [2, 80, 64]]
    assert denoiser.summary.images == 2 and "on 2 images" in denoiser.summary.headline()
    assert denoiser.context_planes == 0  # a 2D image among them: no stack context
    saved = Denoiser.load(denoiser.save(tmp_path / "m.safetensors"), device="cpu")
    assert saved.model.fitted_on == model.fitted_on
    # A fine-tune knows what its starting model knew.
    tuned = Denoiser.from_model(saved.model, device="cpu").fit(first, "YX", iterations=1, names=["c.tif"])
    assert [image["name"] for image in tuned.model.fitted_on] == ["a.tif", "b.tif", "c.tif"]


def test_a_single_image_fit_is_the_same_through_a_list():
    _, noisy = noisy_image((64, 64), seed=4)
    # One thread each: "auto" counts the cores free at the start, and a thread count of its own
    # would sum in another order.
    alone = Denoiser(preset="tiny", device="cpu", threads=1).fit(noisy, "YX", iterations=2)
    listed = Denoiser(preset="tiny", device="cpu", threads=1).fit([noisy], "YX", iterations=2)
    np.testing.assert_array_equal(alone.predict(noisy, ensemble=1), listed.predict(noisy, ensemble=1))


@pytest.mark.parametrize("images, names, words", [
    ([], None, "at least one"),
    ([np.zeros((64, 64, 2), np.float32), np.zeros((64, 64), np.float32)], None, "channel"),
    ([np.zeros((64, 64), np.float32)] * 2, ["one"], "one name per image"),
])
def test_bad_image_sets_are_refused_with_the_fix(images, names, words):
    axes = None if images and images[0].ndim == 3 else "YX"
    items = [(images[0], "YXC"), (images[1], "YX")] if axes is None else images
    with pytest.raises((BadInput, ValueError), match=words):
        Denoiser(preset="tiny", device="cpu").fit(items, axes, iterations=1, names=names)


def test_images_that_disagree_on_their_noise_are_said_to():
    _, first = noisy_image((96, 96), seed=1, peak=30)
    _, second = noisy_image((96, 96), seed=2, peak=30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Denoiser(preset="tiny", device="cpu", camera="off").fit([first, 2.0 * second], "YX", iterations=1)
    assert any("disagree on their noise" in str(w.message) for w in caught)
    _, dim = noisy_image((96, 96), seed=3, peak=8)  # the same camera, a dimmer sample: no warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Denoiser(preset="tiny", device="cpu", camera="off").fit([first, second, dim], "YX", iterations=1)
    assert not any("disagree" in str(w.message) for w in caught)


def test_predict_many_is_predict_for_each_and_reports_progress_over_the_set():
    _, first = noisy_image((64, 96), seed=1)
    _, second = noisy_image((64, 64), seed=2)
    denoiser = Denoiser(preset="tiny", device="cpu").fit([first, second], "YX", iterations=2)
    seen = []
    results = denoiser.predict_many([first, second], callback=seen.append, ensemble=1)
    for result, image in zip(results, (first, second)):
        # predict's path, whose blindness tests/test_blindness.py proves.
        np.testing.assert_array_equal(result, denoiser.predict(image, ensemble=1))
    fractions = [item.fraction for item in seen if hasattr(item, "fraction")]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


class _Recorder:
    """A job's destination that hands back each prediction and records which images came."""

    def __init__(self) -> None:
        self.delivered = []

    def finished(self, image):
        return None

    def deliver(self, image, data, axes, like, denoiser, cancel, threads):
        self.delivered.append(image.name)
        return (yield from denoiser.predict_iter(data, axes, cancel=cancel, ensemble=1))


def test_a_job_stopped_after_the_fit_keeps_the_model_and_writes_nothing():
    _, noisy = noisy_image((64, 64), seed=1)
    denoiser = Denoiser(preset="tiny", device="cpu")
    stops = Stops()
    recorder = _Recorder()

    def cancel_when_ready(item):
        if type(item).__name__ == "ModelReady":
            stops.cancel.set()

    images = [JobImage(f"n{i}", lambda: (noisy, "YX", None)) for i in range(2)]
    summary = drive(run_job(denoiser, images, stops, fit=FitRequest(2),
                            destination=recorder), cancel_when_ready)
    assert summary.stopped and denoiser.is_fitted and recorder.delivered == []


# -- the command line ---------------------------------------------------------------------------


def _digest(folder):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


@pytest.fixture
def raw_folder(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for index in range(3):
        tifffile.imwrite(raw / f"field{index}.tif", noisy_image((64, 80), seed=index)[1].astype(np.float32))
    (raw / "broken.tif").write_bytes(b"II*\x00 truncated")
    np.save(raw / "wrong.npy", np.zeros((64, 64, 3), np.float32))  # three channels for a one-channel model
    return raw


def test_a_folder_with_bad_files_completes_the_others_names_them_and_resumes(raw_folder, tmp_path, capsys,
                                                                             monkeypatch):
    model = tmp_path / "model.safetensors"
    good = [str(raw_folder / f"field{index}.tif") for index in range(3)]
    assert main(["fit", *good, "-o", str(model), "--preset", "tiny", "--iterations", "2", "--quiet"]) == 0
    assert len(Denoiser.load(model).model.fitted_on) == 3
    before = _digest(raw_folder)
    out = tmp_path / "denoised"
    assert main(["predict", str(raw_folder), "--model", str(model), "-o", str(out), "--ensemble", "1"]) == 2
    err = capsys.readouterr().err
    assert "broken.tif" in err and "wrong.npy" in err and "2 of 5 inputs failed" in err
    assert sorted(path.name for path in out.iterdir()) == ["field0.tif", "field1.tif", "field2.tif"]
    complete = _digest(out)
    assert _digest(raw_folder) == before  # no input touched

    # Interrupted after the first file (a Ctrl-C), then run again: the rest is done, the same.
    partial = tmp_path / "partial"
    from napari_tbsn import denoiser as facade

    real = facade.Denoiser.predict_iter
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(facade.Denoiser, "predict_iter", interrupted)
    assert main(["predict", *good, "--model", str(model), "-o", str(partial), "--ensemble", "1", "--quiet"]) == 130
    assert sorted(path.name for path in partial.iterdir()) == ["field0.tif"]
    monkeypatch.setattr(facade.Denoiser, "predict_iter", real)
    assert main(["predict", *good, "--model", str(model), "-o", str(partial), "--ensemble", "1"]) == 0
    assert "field0.tif: skipped" in capsys.readouterr().err
    assert _digest(partial) == complete


def test_denoise_fits_one_model_on_all_inputs_and_writes_each(raw_folder, tmp_path):
    out = tmp_path / "out"
    model = out / "model.safetensors"  # the model may go into the output folder
    inputs = [str(raw_folder / f"field{index}.tif") for index in range(2)]
    assert main(["denoise", *inputs, "-o", str(out), "--preset", "tiny", "--iterations", "2", "--format", "npy",
                 "--save-model", str(model), "--quiet"]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["field0.npy", "field1.npy", "model.safetensors"]
    assert np.load(out / "field0.npy").shape == (64, 80)
    assert [image["name"] for image in Denoiser.load(model).model.fitted_on] == inputs


@pytest.mark.parametrize("case, words", [
    ("output is the input folder", "folder holding the input"),
    ("two inputs, one name", "would both be written"),
    ("output is a file", "is a file"),
    ("uncertainty with several", "takes a single input"),
    ("names differ only in case", "would both be written"),
])
def test_batch_paths_that_would_lose_data_are_refused_before_any_work(raw_folder, tmp_path, capsys, case, words):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"not read: the paths are refused first")
    other = tmp_path / "other"
    other.mkdir()
    tifffile.imwrite(other / "field0.tif", np.zeros((64, 64), np.float32))
    taken = tmp_path / "taken.tif"
    taken.write_bytes(b"x")
    args = {
        "output is the input folder": [str(raw_folder), "-o", str(raw_folder)],
        "two inputs, one name": [str(raw_folder / "field0.tif"), str(other / "field0.tif"), "-o", str(tmp_path / "o")],
        "output is a file": [str(raw_folder), "-o", str(taken)],
        "uncertainty with several": [str(raw_folder), "-o", str(tmp_path / "o"), "--uncertainty",
                                     str(tmp_path / "u.tif")],
        "names differ only in case": [str(raw_folder / "field0.tif"), str(other / "FIELD0.tif"), "-o",
                                      str(tmp_path / "o")],
    }[case]
    if case == "names differ only in case":
        (other / "field0.tif").rename(other / "FIELD0.tif")
    before = _digest(raw_folder)
    assert main(["predict", *args, "--model", str(model), "--quiet"]) == 2
    assert words in capsys.readouterr().err
    assert _digest(raw_folder) == before and not (tmp_path / "o").exists()


def test_a_stop_during_training_ends_it_and_the_job_still_denoises_without_a_student():
    _, noisy = noisy_image((64, 64), seed=1)
    denoiser = Denoiser(preset="tiny", device="cpu")
    stops = Stops()
    seen = []

    def stop_in_training(item):
        seen.append(item)
        stops.follow(item)
        if getattr(item, "phase", None) == "fit" and item.step.iteration == 3:
            assert stops.stop() == "training"

    images = [JobImage("one", lambda: (noisy, "YX", None))]
    summary = drive(run_job(denoiser, images, stops, fit=FitRequest(100_000, student="on"), destination=_Recorder()),
                    stop_in_training)
    assert 3 <= denoiser.summary.iterations < 100_000 and denoiser.student is None
    ready = [item for item in seen if type(item).__name__ == "ModelReady"]
    assert "no student" in ready[0].note
    assert [report.status for report in summary.reports] == ["done"] and summary.done[0].result.shape == (64, 64)


def test_predict_many_is_exactly_blind():
    """The set path feeds the network as predict does: a pixel's own noisy value never reaches
    its output (plain blind-spot mean, lattice filter on), while its neighbours' outputs move."""
    from napari_tbsn import PredictOptions

    from .test_blindness import _seam_model

    options = PredictOptions(estimator="blind_spot", ensemble=1, lattice=True, tile_size=64, tile_overlap=0)
    denoiser = Denoiser.from_model(_seam_model(), options, device="cpu")
    _, first = noisy_image((64, 128), seed=1)
    _, second = noisy_image((128, 64), seed=2)
    before = denoiser.predict_many([first, second], "YX")
    for y, x in ((5, 7), (63, 31), (64, 32), (100, 60)):
        changed = second.copy()
        changed[y, x] += 40.0
        after = denoiser.predict_many([first, changed], "YX")
        np.testing.assert_array_equal(after[0], before[0])
        assert after[1][y, x] == before[1][y, x], (y, x)
        assert np.abs(after[1] - before[1]).max() > 1e-3  # the perturbation is seen by the other pixels


def test_a_fit_over_a_folder_leaves_out_what_does_not_fit_and_says_so(raw_folder, tmp_path, capsys):
    model = tmp_path / "model.safetensors"
    assert main(["fit", str(raw_folder), "-o", str(model), "--preset", "tiny", "--iterations", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "broken.tif" in err and "wrong.npy" in err and "left out of the fit" in err
    assert [Path(image["name"]).name for image in Denoiser.load(model).model.fitted_on] == \
        ["field0.tif", "field1.tif", "field2.tif"]


def test_a_blank_field_among_the_images_is_said_to_and_the_fit_goes_on():
    _, noisy = noisy_image((96, 96), seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        denoiser = Denoiser(preset="tiny", device="cpu", camera="off").fit([noisy, np.full_like(noisy, 100.0)], "YX",
                                                                           iterations=1)
    assert denoiser.is_fitted and any("shows no noise" in str(w.message) for w in caught)


def test_a_rerun_that_finds_every_output_written_fits_nothing(raw_folder, tmp_path, capsys):
    out = tmp_path / "out"
    inputs = [str(raw_folder / f"field{index}.tif") for index in range(2)]
    argv = ["denoise", *inputs, "-o", str(out), "--preset", "tiny", "--iterations", "1", "--student", "off"]
    assert main([*argv, "--quiet"]) == 0
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "fitted:" not in err and err.count(": skipped: ") == 2 and "nothing to fit" in err


def test_a_model_file_may_not_replace_an_input_that_shares_its_name_with_another(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
        tifffile.imwrite(folder / "x.tif", noisy_image((64, 64))[1].astype(np.float32))
    before = (first / "x.tif").read_bytes()
    assert main(["fit", str(first / "x.tif"), str(second / "x.tif"), "-o", str(first / "x.tif"), "--quiet"]) == 2
    assert "input" in capsys.readouterr().err and (first / "x.tif").read_bytes() == before


def test_the_channels_most_images_have_decide_what_a_folder_fit_leaves_out(tmp_path, capsys):
    folder = tmp_path / "raw"
    folder.mkdir()
    np.save(folder / "a_preview.npy", np.zeros((64, 64, 3), np.float32))  # sorts first, three channels
    for index in range(2):
        tifffile.imwrite(folder / f"field{index}.tif", noisy_image((64, 64), seed=index)[1].astype(np.float32))
    model = tmp_path / "m.safetensors"
    assert main(["fit", str(folder), "-o", str(model), "--preset", "tiny", "--iterations", "1", "--quiet"]) == 2
    assert "a_preview.npy" in capsys.readouterr().err
    assert [Path(image["name"]).name for image in Denoiser.load(model).model.fitted_on] == ["field0.tif", "field1.tif"]
