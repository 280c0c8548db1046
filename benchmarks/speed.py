"""Speed benchmark: training iterations/s and prediction megapixels/s for each preset, on the
CPU and on CUDA when present, with peak memory. All numbers come from this one run.

    python benchmarks/speed.py [--presets tiny,small,paper] [--seconds 20]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from napari_tbsn import Denoiser
from napari_tbsn.devices import available_devices


def peak_host_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(preset: str, device: str, seconds: float, size: int) -> dict:
    rng = np.random.default_rng(0)
    image = rng.poisson(10.0, (size, size)).astype(np.float32)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    denoiser = Denoiser(preset=preset, device=device)
    denoiser.fit(image, "YX", iterations=3)  # warm-up (and compilation where it applies)
    denoiser.fit(image, "YX", time_budget=seconds)
    # The training loop alone: the variance-head and lattice fits after it are not iterations.
    fit_rate = denoiser.summary.iterations / denoiser.summary.seconds
    start = time.perf_counter()
    denoiser.predict(image, "YX", ensemble=1)  # one pass (ensemble "auto" would average 8 here)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    predict_rate = size * size / 1e6 / (time.perf_counter() - start)
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else float("nan")
    return {"preset": preset, "device": device, "fit_it_s": fit_rate, "predict_mpx_s": predict_rate,
            "batch": f"{denoiser.fit_config.batch_size}x{denoiser.fit_config.patch_size}^2",
            "host_peak_mb": peak_host_mb(), "gpu_peak_mb": gpu_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,small,paper")
    parser.add_argument("--seconds", type=float, default=20.0, help="fitting seconds per measurement")
    parser.add_argument("--size", type=int, default=512, help="image size for prediction")
    parser.add_argument("--devices", default="cpu,cuda", help="cpu, cuda (the first GPU) or both, where present")
    args = parser.parse_args()
    kinds = args.devices.split(",")
    devices = [d for d, _ in available_devices() if (d == "cpu" and "cpu" in kinds) or (d == "cuda:0" and "cuda" in kinds)]
    rows = [measure(p, d, args.seconds, args.size) for d in devices for p in args.presets.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; prediction on {args.size}x{args.size}")
    print("| preset | device | fit batch | fit it/s | predict Mpx/s | host peak MB | GPU peak MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['preset']} | {r['device']} | {r['batch']} | {r['fit_it_s']:.2f} | {r['predict_mpx_s']:.3f} | "
              f"{r['host_peak_mb']:.0f} | {r['gpu_peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
