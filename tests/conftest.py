from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def noisy_image(shape=(96, 128), seed=0, peak=20.0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth synthetic 'cells' image and its Poisson-Gaussian noisy version (photons)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.arange(shape[-2]), np.arange(shape[-1]), indexing="ij")
    clean = np.zeros(shape[-2:])
    for _ in range(12):
        cy, cx = rng.uniform(0, shape[-2]), rng.uniform(0, shape[-1])
        clean += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(4, 10) ** 2))
    clean = peak * clean / clean.max()
    clean = np.broadcast_to(clean, shape).copy()
    noisy = rng.poisson(clean) + rng.normal(0, 1, shape)
    return clean, noisy.astype(np.float32)


def _device_missing(name: str) -> str | None:
    """Why the device `name` cannot run here (None: it can)."""
    if name == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU here: this variant runs where there is one (scripts/gpu_check.sh)"
    mps = getattr(torch.backends, "mps", None)
    if name == "mps" and not (mps is not None and mps.is_available()):
        return "no Apple MPS here: this variant runs on a Mac with one"
    return None


@pytest.fixture(scope="session", params=["cpu", "cuda", "mps"])
def device(request) -> str:
    """Every test of fitting, prediction, distillation, export and model files takes this: it
    runs on the CPU always, and again on CUDA and on MPS where they are present (skipped, with
    the reason, where not), with the same assertions. TBSN_TEST_DEVICES (e.g. "cuda") keeps
    only the devices it names."""
    import os

    wanted = os.environ.get("TBSN_TEST_DEVICES")
    if wanted and request.param not in wanted.split(","):
        pytest.skip(f"TBSN_TEST_DEVICES={wanted}")
    missing = _device_missing(request.param)
    if missing:
        pytest.skip(missing)
    return request.param


# Two runs of one model agree to float32 rounding on a CPU predicting in float32; a CPU with bf16
# units predicts in bfloat16 (CPU_BF16_AGREEMENT; a direct network call to compare with runs under
# in_prediction_precision); on a GPU they predict in bfloat16 (Ampere on) with convolutions in
# TF32, and differently shaped batches or windows round differently.
GPU_AGREEMENT = 2e-2


# On a CPU predicting in bfloat16 (AMX or AVX512-BF16), oneDNN picks its kernels and blocking by
# shape, so differently shaped tiles or batches may round an output differently. The network's
# last layer hands on bf16 values: one bf16 step (2^-8 relative) of an output near the top of a
# normalised range of about 1 is ~4e-3 of it; this allows two such steps, half the GPU's
# allowance, and still catches a tiling or context bug. (On this session's AMX Xeon every
# comparison agreed within 1e-5 absolute: oneDNN rounded alike across these shapes there.)
CPU_BF16_AGREEMENT = 1e-2


def agreement(device, reference: np.ndarray, cpu_atol: float) -> float:
    """The absolute tolerance for comparing two predictions made on `device`: `cpu_atol` on a
    CPU predicting in float32, CPU_BF16_AGREEMENT of the reference's range on one predicting in
    bfloat16, GPU_AGREEMENT of it on a GPU (never less than `cpu_atol`)."""
    from napari_tbsn.prediction import prediction_precision

    device = torch.device(device)
    span = float(np.max(reference) - np.min(reference))
    if device.type != "cpu":
        return max(cpu_atol, GPU_AGREEMENT * span)
    return max(cpu_atol, CPU_BF16_AGREEMENT * span) if prediction_precision(device) else cpu_atol


def in_prediction_precision(denoiser):
    """A context in which a direct call of `denoiser`'s networks computes in the precision its
    predictions use (bfloat16 autocast on devices with bf16 units, float32 elsewhere), so that a
    prediction can be compared with that call at float32 rounding, not at bf16's."""
    from napari_tbsn.prediction import prediction_autocast

    dtype = prediction_autocast(denoiser.model, denoiser.device)
    return torch.autocast(denoiser.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@pytest.fixture(scope="session")
def fitted_tiny(device):
    """A tiny Denoiser fitted briefly on a synthetic image (shared: fitting costs seconds)."""
    from napari_tbsn import Denoiser

    _, noisy = noisy_image((128, 128))
    return Denoiser(preset="tiny", device=device, seed=0).fit(noisy, "YX", iterations=30)


@pytest.fixture(autouse=True)
def _fresh_cpu_load():
    """Every test measures the other processes' load itself (choose_threads reuses a measurement
    for a few seconds: one test's stand-in load must not reach the next)."""
    from napari_tbsn import devices

    devices.forget_busy_cores()
    yield
    devices.forget_busy_cores()


@pytest.fixture(autouse=True)
def _memory_record(request):
    """With TBSN_MEMORY_REPORT=FILE, append each test that raised this process's peak memory and
    by how much (MB of ru_maxrss): what finds the test that holds the machine."""
    import os
    import resource

    report = os.environ.get("TBSN_MEMORY_REPORT")
    if not report:
        yield
        return
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if after > before:
        with open(report, "a") as handle:
            handle.write(f"{(after - before) / 1024:.0f}\t{after / 1024:.0f}\t{request.node.nodeid}\n")
