"""Memory benchmark: peak RSS while denoising memmapped uint16 stacks into a memmapped output.

Each stack size runs in a fresh process and reports its own peak RSS (VmHWM), with
an untrained tiny network: memory, not quality, is measured. Peak memory should follow the
tile and plane size, not the number of planes.

    python benchmarks/memory.py --planes 20,80 --size 1024
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import sys, numpy as np, torch
from napari_tbsn import Denoiser
from napari_tbsn.normalization import Normalizer
planes, size, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
data = np.lib.format.open_memmap(f"{folder}/in.npy", mode="r")
out = np.lib.format.open_memmap(f"{folder}/out.npy", mode="w+", dtype=np.float32, shape=data.shape)
torch.manual_seed(0)
from napari_tbsn import FittedModel, PredictOptions
from napari_tbsn.network import TBSN
# pd 1, as a fit on pixel-independent noise leaves it: one pass, no R3 rounds.
model = FittedModel(TBSN.from_preset("tiny").eval(), Normalizer((0.0,), (1000.0,)), pd=1, preset="tiny", axes="ZYX")
denoiser = Denoiser.from_model(model, PredictOptions(tile_size=1024, tile_overlap=0), device="cpu")
denoiser.predict(data, "ZYX", out=out)
assert np.isfinite(out[-1]).all()
# VmHWM is this process image's own peak; ru_maxrss would also carry the peak of the parent
# that forked it (Linux keeps it across exec), hiding what this process did.
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024)
"""


def make_stack(path: Path, planes: int, size: int) -> None:
    import numpy as np

    stack = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(planes, size, size))
    rng = np.random.default_rng(0)
    for index in range(planes):
        stack[index] = rng.poisson(100, (size, size))
    stack.flush()
    del stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--planes", default="20,80")
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    rows = []
    for planes in (int(p) for p in args.planes.split(",")):
        with tempfile.TemporaryDirectory() as folder:
            make_stack(Path(folder) / "in.npy", planes, args.size)
            start = time.perf_counter()
            result = subprocess.run([sys.executable, "-c", CHILD, str(planes), str(args.size), folder],
                                    check=True, capture_output=True, text=True)
            rows.append((planes, float(result.stdout.strip().splitlines()[-1]), time.perf_counter() - start))
    stack_mb = lambda planes: planes * args.size**2 * (2 + 4) / 2**20  # noqa: E731 (uint16 in + float32 out)
    print(f"tiny preset, {args.size}x{args.size} uint16 planes, memmap in and out")
    print("| planes | stack in+out MB | peak RSS MB | seconds |")
    print("| --- | --- | --- | --- |")
    for planes, peak, seconds in rows:
        print(f"| {planes} | {stack_mb(planes):.0f} | {peak:.0f} | {seconds:.0f} |")
    if len(rows) > 1:
        print(f"peak RSS difference: {rows[-1][1] - rows[0][1]:.1f} MB")


if __name__ == "__main__":
    main()
