"""What only a CUDA GPU can show: agreement with the CPU, repeatable seeded fits, real
out-of-memory back-off, DDP over nccl and a GPU worker. Skipped, with the reason, where there
is no GPU; scripts/gpu_check.sh runs them (and every `device` test's CUDA variant) on one."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from napari_tbsn import Denoiser

from .conftest import noisy_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU here: these run where there is one (scripts/gpu_check.sh)")

# bfloat16 autocast on the GPU against float32 on the CPU, in units of the output's range.
AGREEMENT = 0.02


def test_a_saved_model_predicts_alike_on_the_cpu_and_the_gpu(tmp_path):
    _, noisy = noisy_image((2, 160, 160), seed=5)
    path = Denoiser(preset="tiny", device="cuda", seed=0).fit(noisy, "ZYX", iterations=40).save(tmp_path / "m.safetensors")
    on_cpu = Denoiser.load(path, device="cpu").predict(noisy, "ZYX", ensemble=1)
    on_gpu = Denoiser.load(path, device="cuda").predict(noisy, "ZYX", ensemble=1)
    spread = float(on_cpu.max() - on_cpu.min())
    assert np.abs(on_cpu - on_gpu).max() <= AGREEMENT * spread


def test_a_seeded_gpu_fit_repeats():
    _, noisy = noisy_image((128, 128), seed=6)
    first, second = (Denoiser(preset="tiny", device="cuda", seed=3).fit(noisy, "YX", iterations=20) for _ in range(2))
    out = [d.predict(noisy, "YX", ensemble=1) for d in (first, second)]
    np.testing.assert_allclose(out[0], out[1], atol=1e-4 * float(out[0].max() - out[0].min()))


@pytest.fixture
def little_gpu_memory():
    """The GPU's memory cut to 2% of it for this process (a real CUDA out-of-memory error)."""
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(0.02)
    yield
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()


def test_a_fit_out_of_gpu_memory_halves_its_batch_and_completes(little_gpu_memory):
    import dataclasses

    from napari_tbsn.config import FIT_PRESETS

    _, noisy = noisy_image((512, 512), seed=7)
    config = dataclasses.replace(FIT_PRESETS["paper"], batch_size=64, patch_size=256, compile="never")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # The closing fits (posterior head, lattice) have no back-off of their own: left out here.
        denoiser = Denoiser(preset="paper", device="cuda", fit_config=config, estimator="blind_spot",
                            lattice=False).fit(noisy, "YX", iterations=2)
    assert any("ran out of memory while fitting" in str(w.message) for w in caught)
    assert denoiser.summary.iterations == 2


def test_a_prediction_out_of_gpu_memory_goes_on_with_smaller_tiles(little_gpu_memory):
    _, noisy = noisy_image((1024, 1024), seed=8)
    denoiser = Denoiser(preset="paper", device="cuda").fit(noisy[:256, :256], "YX", iterations=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = denoiser.predict(noisy, "YX", tile_size=1024, ensemble=1)
    assert any("ran out of memory with 1024-pixel tiles" in str(w.message) for w in caught)
    assert out.shape == noisy.shape and np.all(np.isfinite(out))


def test_ddp_over_nccl_on_every_gpu(tmp_path):
    """torchrun with one process per GPU (one GPU: a group of one, which still runs nccl)."""
    import tifffile

    _, noisy = noisy_image((4, 96, 96), seed=21)
    tifffile.imwrite(tmp_path / "in.tif", noisy, metadata={"axes": "ZYX"})
    gpus = torch.cuda.device_count()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
               "-m", "napari_tbsn", "fit", str(tmp_path / "in.tif"), "-o", str(tmp_path / "model.safetensors"),
               "--preset", "tiny", "--iterations", "6", "--device", "cuda"]
    finished = subprocess.run(command, capture_output=True, text=True, env={**os.environ}, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert f"fitting on {gpus} process(es) with DistributedDataParallel" in finished.stderr
    denoiser = Denoiser.load(tmp_path / "model.safetensors", device="cuda")
    assert (denoiser.summary.processes, denoiser.summary.iterations) == (gpus, 6)


def test_a_gpu_worker_predicts_what_one_process_does(tmp_path):
    zarr = pytest.importorskip("zarr")
    distributed = pytest.importorskip("distributed")
    import logging

    _, stack = noisy_image((4, 128, 256), seed=9)
    denoiser = Denoiser(preset="tiny", device="cuda").fit(stack, "ZYX", iterations=3)
    source = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=stack.shape, chunks=(1, 128, 128),
                             dtype="float32")
    source[:] = stack
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="w", shape=stack.shape, chunks=(1, 128, 128),
                          dtype="float32")
    expected = denoiser.predict(stack, "ZYX", tile_size=128, ensemble=1)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=logging.CRITICAL) as cluster, distributed.Client(cluster) as client:
        denoiser.predict(source, "ZYX", out=out, client=client, tile_size=128, ensemble=1)
    np.testing.assert_allclose(out[:], expected, atol=1e-3 * float(expected.max() - expected.min()))
