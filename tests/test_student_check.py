"""The student's check against its teacher (distillation.check_student): Stein's unbiased risk
estimate on held-out pixels, the verdict, and which network "auto" then predicts with."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from napari_tbsn import Denoiser
from napari_tbsn import distillation
from napari_tbsn.config import PredictOptions, student_option
from napari_tbsn.distillation import CHECK_STEP, CHECK_TOLERANCE_DB, judge, noise_variance_used, risk_terms
from napari_tbsn.prediction import uses_student
from napari_tbsn.student import DistilSummary

from .conftest import noisy_image
from .test_distillation import with_student


def assert_unbiased(estimate: np.ndarray, true: np.ndarray) -> None:
    """The per-pixel estimates' mean is the true one's within 3 standard errors of their difference."""
    error = estimate - true
    assert abs(error.mean()) < 3 * error.std() / math.sqrt(error.size) + 1e-12, (estimate.mean(), true.mean())


def _posterior_like(noisy, clean, variance, weight):
    """A teacher's three outputs for w y + (1 - w) x: estimate, posterior variance, SURE."""
    estimate = weight * noisy + (1 - weight) * clean
    return estimate, weight * variance, (estimate - noisy) ** 2 - variance + 2 * weight * variance


def _gaussian(shape, seed, low=0.2, high=0.8):
    rng = np.random.default_rng(seed)
    clean = rng.uniform(low, high, shape)
    variance = 0.002 + 0.01 * clean  # Poisson-Gaussian-like: each pixel its own variance
    noisy = clean + rng.normal(size=shape) * np.sqrt(variance)
    signs = np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    return clean, variance, noisy, signs, CHECK_STEP * np.sqrt(variance)


@pytest.mark.parametrize("teacher_weight, student_weight", [(0.3, 0.1), (0.3, 0.6), (0.2, 0.2), (1.0, 0.5)])
def test_the_estimated_difference_is_the_true_one_for_known_estimators(teacher_weight, student_weight):
    """Both pull the noisy pixel toward the clean one, with squared error w^2 times the noise
    variance. The check sees only the teacher's three outputs (its noise variance read back from
    them) and the student's outputs, plain and nudged."""
    clean, variance, noisy, signs, step = _gaussian((1, 400, 400), seed=0)
    teacher = _posterior_like(noisy, clean, variance, teacher_weight)
    np.testing.assert_allclose(noise_variance_used(noisy, teacher), variance, rtol=1e-9)
    student_output = student_weight * noisy + (1 - student_weight) * clean
    nudged = student_weight * (noisy + step * signs) + (1 - student_weight) * clean
    difference, error = risk_terms(noisy, teacher, [student_output, student_output, nudged], signs[None], step)
    true = (student_output - clean) ** 2 - (teacher[0] - clean) ** 2
    assert true.mean() == pytest.approx((student_weight**2 - teacher_weight**2) * variance.mean(),
                                        abs=0.02 * variance.mean())
    assert_unbiased(difference, true)
    assert abs(error.mean() - ((teacher[0] - clean) ** 2).mean()) < 0.02 * variance.mean()


def test_a_nonlinear_student_is_judged_by_its_own_slope():
    """A student that clips at zero (slope 0 there, 1 elsewhere) against the noisy pixel itself."""
    clean, variance, noisy, signs, step = _gaussian((1, 500, 500), seed=1, low=0.0, high=0.1)
    teacher = _posterior_like(noisy, clean, variance, 1.0)
    clipped = [np.clip(values, 0.0, None) for values in (noisy, noisy, noisy + step * signs)]
    difference, _ = risk_terms(noisy, teacher, clipped, signs[None], step)
    true = (clipped[0] - clean) ** 2 - (noisy - clean) ** 2
    assert true.mean() < -0.1 * variance.mean()
    assert_unbiased(difference, true)


def test_the_delivered_output_is_judged_and_the_float32_passes_give_only_the_slope():
    """A student whose delivered output is off by a constant is judged worse by that much, its
    float32 passes unchanged."""
    clean, variance, noisy, signs, step = _gaussian((1, 300, 300), seed=2)
    teacher = _posterior_like(noisy, clean, variance, 0.3)
    exact = 0.3 * noisy + 0.7 * clean
    nudged = 0.3 * (noisy + step * signs) + 0.7 * clean
    level, _ = risk_terms(noisy, teacher, [exact, exact, nudged], signs[None], step)
    shifted, _ = risk_terms(noisy, teacher, [exact + 0.01, exact, nudged], signs[None], step)
    assert shifted.mean() - level.mean() == pytest.approx(1e-4, rel=0.05)


def test_the_verdict_allows_the_tolerance_and_no_more():
    error = np.full(10_000, 0.001)
    within = np.full(10_000, 0.001 * (10 ** (0.9 * CHECK_TOLERANCE_DB / 10) - 1))
    beyond = np.full(10_000, 0.001 * (10 ** (1.1 * CHECK_TOLERANCE_DB / 10) - 1))
    better = np.full(10_000, -0.0002)
    assert judge(within, error).preferred and not judge(beyond, error).preferred
    check = judge(better, error)
    assert check.preferred and check.change_db == pytest.approx(-10 * math.log10(0.8))
    assert "the student denoises" in check.note and "10000 held-out pixels" in check.note
    assert "the teacher denoises" in judge(beyond, error).note


def test_a_teacher_error_below_the_estimates_noise_is_judged_by_the_difference_alone():
    rng = np.random.default_rng(2)
    error = np.full(1000, -0.0001)
    worse = 0.001 + 0.0001 * rng.normal(size=1000)
    level = 0.0001 * rng.normal(size=1000)
    assert judge(worse, error).preferred is False and judge(worse, error).change_db is None
    assert judge(level, error).preferred is True


@pytest.mark.parametrize("preferred", [True, False, None])
def test_auto_takes_the_student_unless_its_check_found_it_worse(preferred):
    denoiser = with_student(Denoiser(preset="tiny", pd=1).fit(noisy_image((64, 64), seed=3)[1], "YX", iterations=2))
    student = dataclasses.replace(denoiser.student, summary=DistilSummary(preferred=preferred))
    model = dataclasses.replace(denoiser.model, student=student)
    assert uses_student(model, PredictOptions(student="auto")) is (preferred is not False)
    assert uses_student(model, PredictOptions(student=True)) and not uses_student(model, PredictOptions(student=False))
    assert not uses_student(dataclasses.replace(model, student=None), PredictOptions(student=True))


def test_front_ends_map_their_choice_in_one_place():
    assert [student_option(choice) for choice in ("auto", "on", "off")] == ["auto", True, False]
    assert student_option("on", uncertainty=True) is False
    with pytest.raises(ValueError, match="student must be"):
        student_option("yes")
    with pytest.raises(ValueError, match="student must be True, False or 'auto'"):
        PredictOptions(student="on")


def test_a_summary_saved_before_the_check_loads_unchecked():
    described = dataclasses.asdict(DistilSummary(iterations=5))
    for key in ("estimated_change_db", "preferred", "check"):
        described.pop(key)
    assert DistilSummary(**described).preferred is None


def test_a_student_that_gives_the_teachers_output_is_judged_level(monkeypatch):
    """check_student's plumbing (blocks, regions, camera-free planes): with the 'student' replaced
    by the teacher itself, the estimated difference is zero."""
    _, noisy = noisy_image((256, 256), seed=4)
    teacher = Denoiser(preset="tiny", pd=1).fit(noisy, "YX", iterations=30)

    class TeacherAsStudent:
        def __init__(self, model, device, cancel=None):
            self.runner = distillation.TileModel(teacher.model, teacher.options.replace(student=False), device,
                                                 distillation.ensemble_size(1, teacher.options, noisy.shape), cancel)
            self.bytes_per_pixel = self.runner.bytes_per_pixel

        @property
        def autocast(self):
            return self.runner.autocast

        @autocast.setter
        def autocast(self, value):
            self.runner.autocast = value

        def predict_iter(self, plane, tile_size, region=None):
            return self.runner.predict_iter(plane, tile_size, region)

    monkeypatch.setattr(distillation, "StudentModel", TeacherAsStudent)
    teacher.distil(noisy, "YX", iterations=2)
    summary = teacher.student.summary
    # Level within the estimate's noise (about +-0.15 dB on these 8192 pixels); misplaced blocks,
    # regions or channels would put it dB away.
    assert abs(summary.estimated_change_db) < 0.3, summary.check


def test_the_check_scores_exactly_the_distillations_held_out_blocks(monkeypatch):
    """Every pixel of every validation block, and no other: the regions the check reads hold the
    blocks the student never trained on, and the verdict counts their pixels."""
    _, noisy = noisy_image((256, 256), seed=7)
    teacher = Denoiser(preset="tiny", pd=1).fit(noisy, "YX", iterations=5)
    seen: dict[str, list] = {"samplers": [], "regions": [], "pixels": []}
    sampler_class, terms, verdict = distillation.PatchSampler, distillation.risk_terms, distillation.judge

    def sampler(*args, **kwargs):
        seen["samplers"].append(sampler_class(*args, **kwargs))
        return seen["samplers"][-1]

    monkeypatch.setattr(distillation, "PatchSampler", sampler)
    monkeypatch.setattr(distillation, "risk_terms", lambda noisy, *rest: seen["regions"].append(noisy) or terms(
        noisy, *rest))
    monkeypatch.setattr(distillation, "judge", lambda differences, *rest: seen["pixels"].append(differences.size) or
                        verdict(differences, *rest))
    teacher.distil(noisy, "YX", iterations=2)
    (used,) = seen["samplers"]
    p = used.patch_size
    assert len(used.validation_blocks) >= 2 and seen["pixels"] == [len(used.validation_blocks) * p * p]
    for crop in used.validation:  # each held-out block sits, whole and on the block grid, in a region read
        assert any(np.array_equal(region[:, y : y + p, x : x + p], crop[:1])
                   for region in seen["regions"] for y in range(0, region.shape[1] - p + 1, p)
                   for x in range(0, region.shape[2] - p + 1, p))
