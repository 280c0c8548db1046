"""The distilled student (TBSN2UNet): its network, its tiling, its use in prediction, its file
format, and distillation's stop and cancel."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from napari_tbsn import Denoiser, FitCancelled, FitProgress
from napari_tbsn.cli import main
from napari_tbsn.config import PredictOptions
from napari_tbsn.distillation import DistilProgress, plan_student, target_planes
from napari_tbsn.axes import PlaneLayout
from napari_tbsn.network.unet import StudentConfig, UNet, student_preset
from napari_tbsn.student import Student

from .conftest import agreement, in_prediction_precision, noisy_image


def with_student(denoiser: Denoiser, seed: int = 1) -> Denoiser:
    """The denoiser's model with an untrained (random, so distinct from the teacher) student."""
    model = denoiser.model
    torch.manual_seed(seed)
    inputs = model.channels * (1 + 2 * model.context_planes)
    student = Student(UNet(student_preset("tiny", inputs, model.channels)).eval())
    return Denoiser.from_model(dataclasses.replace(model, student=student), denoiser.options, device=denoiser.device)


@pytest.mark.parametrize("config", [StudentConfig(8, 2, 2), StudentConfig(8, 3, 1), StudentConfig(6, 2, 3, 3, 1)])
def test_the_stated_radius_bounds_the_receptive_field(config):
    torch.manual_seed(0)
    network = UNet(config).double()
    size = 24 * config.size_multiple
    for row, column in ((size // 2, size // 2), (size // 2 + 1, size // 2 + 2), (size // 2 + 3, size // 2 - 1)):
        probe = torch.randn(1, config.in_channels, size, size, dtype=torch.float64, requires_grad=True)
        network.core(probe)[0, 0, row, column].backward()
        reach = (probe.grad[0].abs().sum(0) > 0).nonzero()
        assert (reach[:, 0] - row).abs().max() <= config.radius
        assert (reach[:, 1] - column).abs().max() <= config.radius
        assert (reach[:, 0] - row).abs().max() > config.radius // 2  # the bound is not loose by far


def test_tiled_student_prediction_equals_one_whole_pass(fitted_tiny):
    denoiser = with_student(fitted_tiny)
    _, noisy = noisy_image((300, 420), seed=3)
    whole = denoiser.predict(noisy, "YX", tile_size=4096)
    tiled = denoiser.predict(noisy, "YX", tile_size=64)  # windows keep 64 pixels: 5 x 7 of them
    network = denoiser.student.network
    normalizer = denoiser.normalizer
    with torch.no_grad(), in_prediction_precision(denoiser):
        direct = network(torch.from_numpy(normalizer.normalize(noisy[None]))[None])[0].float().numpy()
    atol = agreement(denoiser.device, whole, 1e-4)
    np.testing.assert_allclose(tiled, whole, atol=atol)
    np.testing.assert_allclose(whole, normalizer.denormalize(direct)[0], atol=atol)


def test_tiled_student_with_channels_and_context_planes_equals_one_whole_pass(device):
    _, stack = noisy_image((4, 2, 150, 200), seed=7)
    teacher = Denoiser(preset="tiny", device=device, pd=1, context=1).fit(stack, "ZCYX", iterations=2)
    assert teacher.context_planes == 1
    denoiser = with_student(teacher)
    assert denoiser.student.config.in_channels == 6 and denoiser.student.config.out_channels == 2
    whole = denoiser.predict(stack, "ZCYX", tile_size=4096)
    tiled = denoiser.predict(stack, "ZCYX", tile_size=64)
    atol = agreement(device, whole, 1e-4)
    np.testing.assert_allclose(tiled, whole, atol=atol)
    block = np.concatenate([stack[1], stack[0], stack[2]])  # plane 1, then its neighbours, as the teacher reads
    with torch.no_grad(), in_prediction_precision(denoiser):
        direct = denoiser.student.network(torch.from_numpy(denoiser.normalizer.normalize(block))[None])[0].float().numpy()
    np.testing.assert_allclose(whole[1], denoiser.normalizer.denormalize(direct), atol=atol)


def test_prediction_uses_the_student_when_present_and_the_teacher_bit_for_bit_when_off(fitted_tiny):
    _, noisy = noisy_image((128, 128), seed=4)
    student = with_student(fitted_tiny)
    teacher_only = fitted_tiny.predict(noisy, "YX")
    np.testing.assert_array_equal(student.predict(noisy, "YX", student=False), teacher_only)
    assert not np.allclose(student.predict(noisy, "YX"), teacher_only, atol=1e-3)
    assert student.quality is None  # the student gives no blind-spot error estimate
    with pytest.raises(ValueError, match="student=False"):
        student.predict(noisy, "YX", uncertainty=np.empty_like(noisy))


def test_a_student_is_saved_beside_the_teacher_and_old_files_still_load(fitted_tiny, tmp_path, device):
    sample = np.arange(2 * 32 * 32, dtype=np.float32).reshape(1, 64, 32)
    denoiser = with_student(fitted_tiny)
    model = dataclasses.replace(denoiser.model, student=dataclasses.replace(denoiser.student, sample=sample))
    Denoiser.from_model(model).save(tmp_path / "with.safetensors")
    loaded = Denoiser.load(tmp_path / "with.safetensors", device=device)
    for name, tensor in model.student.network.state_dict().items():
        assert torch.equal(tensor, loaded.student.network.state_dict()[name])
    np.testing.assert_array_equal(loaded.student.sample, sample)
    fitted_tiny.save(tmp_path / "teacher.safetensors")
    assert Denoiser.load(tmp_path / "teacher.safetensors", device=device).student is None


@pytest.fixture(scope="module")
def distilled(device):
    _, noisy = noisy_image((128, 128), seed=5)
    teacher = Denoiser(preset="tiny", device=device, pd=1).fit(noisy, "YX", iterations=20)
    items = []
    before = teacher.model
    teacher.distil(noisy, "YX", iterations=20, callback=items.append)
    return teacher, before, noisy, items


def test_distillation_reports_both_phases_and_keeps_the_teacher(distilled):
    denoiser, before, noisy, items = distilled
    training = [item for item in items if isinstance(item, FitProgress)]
    assert isinstance(items[0], DistilProgress) and isinstance(items[-1], DistilProgress)
    assert items[0].phase == "teacher targets" and items[-1].phase == "checking the student"
    assert items.index(training[0]) > 0 and items.index(training[-1]) < len(items) - 1
    assert training[-1].iteration == 20 and denoiser.student.summary.iterations == 20
    assert denoiser.student.summary.preferred is not None and "held-out pixels" in denoiser.student.summary.check
    assert denoiser.model.network is before.network  # the teacher is the same object
    assert denoiser.student.sample.shape == (1, 128, 128)
    np.testing.assert_array_equal(denoiser.predict(noisy, "YX", student=False), Denoiser.from_model(before).predict(
        noisy, "YX"))


def test_targets_are_the_teachers_whole_image_output(distilled, monkeypatch):
    """The student learns exactly what predict(student=False) gives."""
    denoiser, before, noisy, _ = distilled
    import napari_tbsn.distillation as distillation

    seen = {}
    original = distillation.PatchSampler

    def spy(stack, *args, **kwargs):
        seen["stack"] = stack
        return original(stack, *args, **kwargs)

    monkeypatch.setattr(distillation, "PatchSampler", spy)
    teacher = Denoiser.from_model(before)
    teacher.distil(noisy, "YX", iterations=1)
    expected = teacher.normalizer.normalize(teacher.predict(noisy, "YX", student=False)[None])
    np.testing.assert_allclose(seen["stack"][0, 1:], expected, atol=1e-5)


def test_a_cancelled_distillation_keeps_the_model_and_a_stopped_one_keeps_its_best(distilled):
    denoiser, before, noisy, _ = distilled
    fresh = Denoiser.from_model(before)
    cancel = threading.Event()

    def stop_at_fifth(item):
        if isinstance(item, FitProgress) and item.iteration == 5:
            cancel.set()

    with pytest.raises(FitCancelled):
        fresh.distil(noisy, "YX", iterations=50, callback=stop_at_fifth, cancel=cancel)
    assert fresh.model is before and fresh.student is None
    stop = threading.Event()

    def end_training(item):
        if isinstance(item, FitProgress) and item.iteration == 5:
            stop.set()

    fresh.distil(noisy, "YX", iterations=50, callback=end_training, stop_training=stop)
    assert fresh.student.summary.iterations == 5 and fresh.student.summary.stopped_early


def test_fine_tuning_drops_the_student_it_no_longer_matches(distilled):
    denoiser, _, noisy, _ = distilled
    tuned = Denoiser.from_model(denoiser.model).fit(noisy, "YX", iterations=2)
    assert tuned.student is None


def test_planning_a_student(fitted_tiny, monkeypatch):
    import napari_tbsn.distillation as distillation

    stack = PlaneLayout.of((400, 512, 512), "ZYX")
    teacher, cpu = fitted_tiny.network, torch.device("cpu")
    assert not plan_student("off", teacher, "tiny", stack, 1, 300, cpu).distil
    on = plan_student("on", teacher, "tiny", stack, 1, 300, cpu)
    assert on.distil and on.fit_budget == 300 and on.distil_budget is None  # the fit keeps its budget
    single = plan_student("auto", teacher, "tiny", PlaneLayout.of((512, 512), "YX"), 8, 300, cpu)
    assert not single.distil and "every plane" in single.reason
    # Timed passes: teacher 10 us/px and student 0.1 us/px, then both 1 us/px.
    rates = iter([1e-5, 1e-7, 1e-6, 1e-6])
    monkeypatch.setattr(distillation, "_seconds_per_pixel", lambda *args: next(rates))
    many = plan_student("auto", teacher, "tiny", stack, 1, 300, cpu)
    assert many.distil and many.fit_budget == 300 and "teacher prediction ~1049 s" in many.reason
    few = plan_student("auto", teacher, "tiny", PlaneLayout.of((8, 512, 512), "ZYX"), 1, 300, cpu)
    # 18 s as before the check, and its 6 student passes over the 4 target planes (6 s).
    assert not few.distil and "teacher prediction ~2 s, distillation and student prediction ~24 s" in few.reason
    with pytest.raises(ValueError, match="auto"):
        plan_student("maybe", teacher, "tiny", stack, 1, None, cpu)


@pytest.mark.parametrize("mixed_precision", [True, False])
def test_the_plan_times_passes_in_the_precision_prediction_will_use(monkeypatch, mixed_precision):
    import napari_tbsn.distillation as distillation
    from napari_tbsn import prediction
    from napari_tbsn.config import FIT_PRESETS

    monkeypatch.setattr(prediction, "autocast_dtype", lambda device: torch.bfloat16)  # a CPU with bf16 units
    timed = []
    monkeypatch.setattr(distillation, "_seconds_per_pixel", lambda *args: timed.append(args[-1]) or 1e-6)
    fit_config = dataclasses.replace(FIT_PRESETS["tiny"], mixed_precision=mixed_precision)
    denoiser = Denoiser(preset="tiny", device="cpu", fit_config=fit_config)
    stack = np.broadcast_to(np.float32(0), (400, 512, 512))  # a plane count a student pays on, without the memory
    denoiser.plan_student("auto", stack, "ZYX")
    assert timed == [torch.bfloat16 if mixed_precision else None] * 2  # the teacher's pass and the student's


def test_target_planes_spread_over_the_stack_in_any_prefix():
    layout = PlaneLayout.of((100, 256, 256), "ZYX")
    picks = [plane[0] for plane in target_planes(layout)]
    assert len(picks) == len(set(picks)) == 16
    assert max(picks[:3]) - min(picks[:3]) > 40


def test_tile_size_is_auto_or_pixels():
    assert PredictOptions().tile_size == "auto"
    assert PredictOptions(tile_size=128).tile_size == 128
    with pytest.raises(ValueError, match="tile_size"):
        PredictOptions(tile_size="big")


def test_cli_distil_then_predict_with_and_without_the_student(distilled, tmp_path):
    denoiser, before, noisy, _ = distilled
    source = tmp_path / "noisy.npy"
    np.save(source, noisy)
    Denoiser.from_model(before).save(tmp_path / "teacher.safetensors")
    assert main(["distil", str(source), "--model", str(tmp_path / "teacher.safetensors"), "-o",
                 str(tmp_path / "student.safetensors"), "--iterations", "3", "--quiet"]) == 0
    for model, choice, name in (("teacher", "auto", "t.npy"), ("student", "off", "s_off.npy"),
                                ("student", "on", "s_on.npy"), ("student", "auto", "s.npy")):
        assert main(["predict", str(source), "--model", str(tmp_path / f"{model}.safetensors"), "-o",
                     str(tmp_path / name), "--student", choice, "--quiet"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "s_off.npy"), np.load(tmp_path / "t.npy"))
    assert not np.array_equal(np.load(tmp_path / "s_on.npy"), np.load(tmp_path / "t.npy"))
    # A student of 3 iterations is far from its teacher: its check finds it worse, so auto takes the teacher.
    summary = Denoiser.load(tmp_path / "student.safetensors").student.summary
    assert summary.preferred is False and summary.estimated_change_db < -1, summary.check
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), np.load(tmp_path / "t.npy"))


def test_cli_refuses_a_student_that_is_not_there(distilled, tmp_path, capsys):
    _, before, noisy, _ = distilled
    source = tmp_path / "noisy.npy"
    np.save(source, noisy)
    Denoiser.from_model(before).save(tmp_path / "teacher.safetensors")
    assert main(["predict", str(source), "--model", str(tmp_path / "teacher.safetensors"), "-o",
                 str(tmp_path / "out.npy"), "--student", "on", "--quiet"]) == 2
    assert "tbsn distil" in capsys.readouterr().err
    assert main(["denoise", str(source), "-o", str(tmp_path / "out.npy"), "--uncertainty", str(tmp_path / "u.npy"),
                 "--student", "on", "--preset", "tiny", "--iterations", "2", "--quiet"]) == 2
    assert "--student off" in capsys.readouterr().err


def test_cli_export_refuses_a_teacher_and_writes_a_package_for_a_student(distilled, tmp_path, capsys):
    pytest.importorskip("bioimageio.spec")
    denoiser, before, _, _ = distilled
    Denoiser.from_model(before).save(tmp_path / "teacher.safetensors")
    assert main(["export", str(tmp_path / "teacher.safetensors"), "-o", str(tmp_path / "t.bioimageio.zip")]) == 2
    assert "distil it first" in capsys.readouterr().err and not (tmp_path / "t.bioimageio.zip").exists()
    denoiser.save(tmp_path / "student.safetensors")
    assert main(["export", str(tmp_path / "student.safetensors"), "-o", str(tmp_path / "s.bioimageio.zip"),
                 "--author", "A. Biologist", "--quiet"]) == 0
    assert (tmp_path / "s.bioimageio.zip").stat().st_size > 0


def test_the_plan_times_passes_a_gpu_is_not_launch_bound_on():
    from napari_tbsn.distillation import timing_side

    big, small = PlaneLayout.of((40, 2048, 2048), "ZYX"), PlaneLayout.of((40, 300, 500), "ZYX")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert timing_side(16, big, cpu) == timing_side(16, small, cpu) == 256
    assert timing_side(16, big, cuda) == 1024
    assert timing_side(16, small, cuda) == 288  # the plane's own side, on the network's grid


def test_the_plan_counts_the_passes_of_the_pd_the_fit_will_choose(monkeypatch):
    """pd "auto" on correlated noise: prediction will run the x8 ensemble, and the plan counts 8
    passes, not the 1 of pd 1 (it did before the fit had measured pd)."""
    from scipy.ndimage import convolve

    import napari_tbsn.denoiser as denoiser_module

    rng = np.random.default_rng(0)
    clean, _ = noisy_image((1024, 1024), seed=5)  # over half a megapixel: pd 1 would predict one view
    kernel = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], float)
    noisy = (clean + 2 * convolve(rng.normal(0, 1, clean.shape), kernel / np.sqrt((kernel**2).sum()))).astype(
        np.float32)
    counted = []
    monkeypatch.setattr(denoiser_module, "plan_student", lambda choice, teacher, preset, layout, passes, *rest:
                        counted.append(passes))
    Denoiser(preset="tiny", device="cpu").plan_student("auto", noisy, "YX")
    Denoiser(preset="tiny", device="cpu", pd=1).plan_student("auto", noisy, "YX")
    Denoiser(preset="tiny", device="cpu", pd=2, refine=2).plan_student("auto", noisy, "YX")
    assert counted == [8, 1, 3]  # R3: one view, and two rounds more
