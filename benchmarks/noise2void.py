"""Noise2Void (CAREamics) as ../shared/BENCHMARK.md runs it: default N2V configuration, 64x64
patches, batch 32, trained on the noisy data for a wall-clock budget, tiled prediction (256,
overlap 48); stacks as 2D planes (axes SYX). CAREamics is not a dependency of napari-tbsn: run
this file with a Python that has it (`pip install careamics`), as benchmarks/camera.py does.

    python benchmarks/noise2void.py noisy.npy YX 300 denoised.npy
"""

from __future__ import annotations

import sys
import tempfile
import time

import numpy as np


def main() -> None:
    source, axes, budget, target = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    import torch
    from careamics import CAREamist
    from careamics.config import create_n2v_config
    from lightning.pytorch.callbacks import Callback

    torch.manual_seed(0)
    noisy = np.load(source).astype(np.float32)
    axes = "YX" if axes == "YX" else "SYX"  # planes of a stack as samples

    class Budget(Callback):
        def __init__(self) -> None:
            self.start = None

        def on_train_batch_end(self, trainer, *args) -> None:
            self.start = self.start or time.perf_counter()
            if time.perf_counter() - self.start > budget:
                trainer.should_stop = True

    config = create_n2v_config("n2v", "array", axes, [64, 64], 32, num_epochs=100_000)
    with tempfile.TemporaryDirectory() as folder:
        engine = CAREamist(config, work_dir=folder, callbacks=[Budget()], enable_progress_bar=False)
        start = time.perf_counter()
        engine.train(train_data=noisy)
        fitted = time.perf_counter() - start
        start = time.perf_counter()
        result = engine.predict(noisy, tile_size=(256, 256), tile_overlap=(48, 48), axes=axes)
        predicted = time.perf_counter() - start
    output = np.asarray(result[0] if isinstance(result, (list, tuple)) else result).reshape(noisy.shape)
    np.save(target, output.astype(np.float32))
    print(f"fitted {fitted:.0f} s, predicted {predicted:.0f} s")


if __name__ == "__main__":
    main()
