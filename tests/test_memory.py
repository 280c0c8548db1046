"""Peak memory follows the plane, not the stack: memmapped input and output stream through.

Each stack size runs in a fresh process and reports its own peak (VmHWM). The
network is replaced by a cheap stand-in so the test measures the streaming, not the model
(benchmarks/memory.py measures the same with the real tiny network).
"""

import subprocess
import sys

import numpy as np

CHILD = r"""
import sys, numpy as np
from napari_tbsn import Denoiser, FittedModel, PredictOptions
from napari_tbsn.network import TBSN
from napari_tbsn.normalization import Normalizer
from napari_tbsn.prediction import TileModel
folder = sys.argv[1]
data = np.lib.format.open_memmap(f"{folder}/in.npy", mode="r")
out = np.lib.format.open_memmap(f"{folder}/out.npy", mode="w+", dtype=np.float32, shape=data.shape)
model = FittedModel(TBSN.from_preset("tiny"), Normalizer((0.0,), (1.0,)), pd=1, preset="tiny", axes="ZYX")
denoiser = Denoiser.from_model(model, PredictOptions(tile_size=512, tile_overlap=0), device="cpu")
TileModel.__call__ = lambda self, batch, inside=None: batch * 2  # the stand-in network
denoiser.predict(data, "ZYX", out=out)
assert np.allclose(out[-1], 2 * data[-1].astype(np.float32), rtol=1e-6)
# VmHWM is this process image's own peak; ru_maxrss would also carry the peak of the parent
# that forked it (Linux keeps it across exec), hiding what this process did.
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024)
"""


def _peak_rss_mb(tmp_path, planes: int, size: int = 1024) -> float:
    folder = tmp_path / str(planes)
    folder.mkdir()
    stack = np.lib.format.open_memmap(folder / "in.npy", mode="w+", dtype=np.uint16, shape=(planes, size, size))
    for index in range(planes):
        stack[index] = index
    stack.flush()
    del stack
    result = subprocess.run([sys.executable, "-c", CHILD, str(folder)], check=True, capture_output=True, text=True)
    return float(result.stdout.strip().splitlines()[-1])


def test_peak_memory_does_not_grow_with_the_number_of_planes(tmp_path):
    small = _peak_rss_mb(tmp_path, 8)
    large = _peak_rss_mb(tmp_path, 40)  # 32 more planes: 192 MB more of input and output
    assert large - small < 40, (small, large)
