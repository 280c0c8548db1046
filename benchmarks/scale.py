"""Scale-out benchmark: prediction on a dask.distributed LocalCluster with 1 and 2 workers.

    python benchmarks/scale.py [--gigabytes 2] [--planes 24] [--preset small] [--folder DIR]

1. A float32 Z-stack of --gigabytes (1024x1024 planes, img2d tiled and shifted per plane, D1's
   noise) is written to a zarr store, one plane per chunk.
2. A model: the --preset teacher fitted for a few iterations with a student of its preset
   attached untrained. Throughput and memory do not depend on the weights, only on the
   architecture, so the benchmark spends no time fitting.
3. Throughput: the first --planes planes (a zarr of their own) predicted by the student on
   LocalClusters of 1 worker (2 torch threads) and 2 workers (1 thread each), against the same
   planes in this process (Denoiser.predict) as the baseline.
4. Memory: the whole stack on 2 workers; each worker process's peak resident memory.
All numbers come from this one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import CASES, DATA  # noqa: E402

from napari_tbsn import Denoiser  # noqa: E402
from napari_tbsn.network.unet import UNet, student_preset  # noqa: E402
from napari_tbsn.student import Student  # noqa: E402

SIDE = 1024


def write_stack(path: Path, planes: int) -> None:
    """img2d tiled 3x3, one shifted 1024x1024 crop per plane, with D1's Poisson-Gaussian noise."""
    import tifffile
    import zarr

    reference = tifffile.imread(DATA / CASES["D1"].reference).astype(np.float64)
    low, high = np.percentile(reference, [0.1, 99.9])
    tiled = np.tile(np.clip((reference - low) / (high - low), 0, 1), (3, 3)) * CASES["D1"].peak
    store = zarr.open_array(str(path), mode="w", shape=(planes, SIDE, SIDE), chunks=(1, SIDE, SIDE), dtype="float32")
    store.attrs["axes"] = "ZYX"
    rng = np.random.default_rng(0)
    for start in range(0, planes, 16):
        block = []
        for z in range(start, min(start + 16, planes)):
            shift = z % (tiled.shape[0] - SIDE)
            clean = tiled[shift : shift + SIDE, shift : shift + SIDE]
            block.append(rng.poisson(clean) + rng.normal(0, CASES["D1"].read_sigma, clean.shape))
        store[start : start + len(block)] = np.asarray(block, dtype=np.float32)


def make_model(path: Path, source, preset: str) -> Denoiser:
    """The preset's teacher, fitted a few iterations, with its preset's student attached."""
    teacher = Denoiser(preset=preset, device="cpu", pd=1, context=1).fit(source[:8], "ZYX", iterations=3)
    model = teacher.model
    torch.manual_seed(0)
    student = Student(UNet(student_preset(preset, 3 * model.channels, model.channels)).eval())
    denoiser = Denoiser.from_model(dataclasses.replace(model, student=student), teacher.options, device="cpu")
    denoiser.save(path)
    return denoiser


def reset_peak() -> None:
    """Start this process's peak resident memory afresh (Linux: writing 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """Peak resident memory since the last reset_peak (VmHWM; a forked worker would otherwise
    report its parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def on_cluster(denoiser: Denoiser, source, target: Path, workers: int) -> dict:
    import zarr
    from distributed import Client, LocalCluster

    out = zarr.open_array(str(target), mode="w", shape=source.shape, chunks=source.chunks, dtype="float32")
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.run(reset_peak)  # workers up before the clock starts
        start = time.perf_counter()
        summary = denoiser.predict_on_cluster(client, source, "ZYX", out)
        seconds = time.perf_counter() - start
        peaks = client.run(peak_rss_mb)
    pixels = int(np.prod(source.shape))
    return {"workers": workers, "seconds": seconds, "mpx_s": pixels / 1e6 / seconds, "blocks": summary.blocks,
            "peak_worker_mb": max(peaks.values()), "out": out}


def main() -> None:
    import zarr

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=2.0)
    parser.add_argument("--planes", type=int, default=24, help="planes of the throughput runs")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--folder", type=Path, help="where the stores go (default: a temporary folder)")
    args = parser.parse_args()
    planes = int(np.ceil(args.gigabytes * 2**30 / (4 * SIDE * SIDE)))
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        folder = Path(folder)
        start = time.perf_counter()
        write_stack(folder / "stack.zarr", planes)
        stack = zarr.open_array(str(folder / "stack.zarr"), mode="r")
        print(f"stack: {stack.shape} float32, {stack.nbytes / 2**30:.2f} GiB, chunks {stack.chunks} "
              f"(written in {time.perf_counter() - start:.0f} s)", flush=True)
        denoiser = make_model(folder / "model.safetensors", stack, args.preset)
        small = zarr.open_array(str(folder / "part.zarr"), mode="w", shape=(args.planes, SIDE, SIDE),
                                chunks=stack.chunks, dtype="float32")
        small[:] = stack[: args.planes]

        reset_peak()
        start = time.perf_counter()
        baseline = denoiser.predict(small, "ZYX")
        seconds = time.perf_counter() - start
        rows = [{"run": f"this process ({torch.get_num_threads()} threads)", "seconds": seconds,
                 "mpx_s": small.size / 1e6 / seconds, "peak_mb": peak_rss_mb()}]
        print(f"{rows[0]['run']}: {seconds:.1f} s, {rows[0]['mpx_s']:.3f} Mpx/s", flush=True)
        for workers in (1, 2):
            result = on_cluster(denoiser, small, folder / f"part_{workers}.zarr", workers)
            difference = float(np.max(np.abs(result["out"][:] - baseline)))
            rows.append({"run": f"LocalCluster, {workers} worker(s)", "seconds": result["seconds"],
                         "mpx_s": result["mpx_s"], "peak_mb": result["peak_worker_mb"], "difference": difference})
            print(f"{rows[-1]['run']}: {result['seconds']:.1f} s, {result['mpx_s']:.3f} Mpx/s, max |difference| "
                  f"{difference:.1e}", flush=True)
        whole = on_cluster(denoiser, stack, folder / "whole.zarr", 2)
        print(f"whole stack on 2 workers: {whole['seconds']:.0f} s, {whole['mpx_s']:.3f} Mpx/s, "
              f"{whole['blocks']} blocks, peak per worker {whole['peak_worker_mb']:.0f} MB", flush=True)

    print(f"\n## Scale-out on this machine ({os.cpu_count()} cores), {args.preset} student, 1024x1024 planes\n")
    print("| run | planes | seconds | Mpx/s | peak memory per process MB |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['run']} | {args.planes} | {row['seconds']:.1f} | {row['mpx_s']:.3f} | {row['peak_mb']:.0f} |")
    print(f"| LocalCluster, 2 workers, whole stack ({stack.nbytes / 2**30:.2f} GiB) | {planes} | "
          f"{whole['seconds']:.0f} | {whole['mpx_s']:.3f} | {whole['peak_worker_mb']:.0f} |")


if __name__ == "__main__":
    main()
