"""How quality moves along one fit: the true PSNR of the averaged weights (the plain blind-spot
mean, whole image) every few iterations, beside the validation loss that picks the kept
weights, on a single-plane case (pd 1). Fixed iterations, so the numbers do not depend on the
machine's speed or load.

    python benchmarks/fit_curve.py --case D6 --iterations 3250 --every 250
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import CASES, make_case, psnr  # noqa: E402


def main() -> None:
    from napari_tbsn.axes import PlaneLayout
    from napari_tbsn.config import FIT_PRESETS
    from napari_tbsn.fitting import FitImage, FitSettings, analyse, starting_network
    from napari_tbsn.patches import PatchSampler, fitting_patch_size, load_training_planes
    from napari_tbsn.training import Trainer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="D6")
    parser.add_argument("--iterations", type=int, default=3250)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plateau", action="store_true", help="run every iteration: no cooldown at the plateau")
    args = parser.parse_args()
    if args.no_plateau:
        import napari_tbsn.training

        napari_tbsn.training.PLATEAU_ITERATIONS = 10**9

    case = CASES[args.case]
    clean, noisy = make_case(case)
    layout = PlaneLayout.of(noisy.shape, case.axes)
    config = FIT_PRESETS[args.preset]
    settings = FitSettings(args.preset, 1, 0, False, False, None, config, args.seed)
    analysis = analyse([FitImage(noisy, layout)], settings)
    network = starting_network(settings, layout, 1, None)
    patch = fitting_patch_size(config.patch_size, layout.height, layout.width, network.size_multiple)
    planes = load_training_planes(noisy, layout, analysis.normalizer, config.max_training_pixels)
    rng = np.random.default_rng(args.seed)
    sampler = PatchSampler(planes, patch, config.validation_fraction, config.validation_patches_max, rng,
                           config.validation_pixels)
    trainer = Trainer(network, sampler, config, torch.device("cpu"), 1, args.seed, threading.Event())
    held = sampler.pixel_masks[0][0]
    image = torch.from_numpy(planes[:, :, : layout.height // 64 * 64, : layout.width // 64 * 64])

    def quality() -> tuple[float, float, float]:
        with trainer.averaged_weights(), torch.no_grad():
            network.eval()
            mean = network(image)[0, 0].numpy()
            network.train()
        estimate = analysis.normalizer.denormalize(mean[None])[0]
        h, w = estimate.shape
        reference, inside = clean.reshape(layout.height, layout.width)[:h, :w], held[:h, :w]
        return psnr(estimate, reference), _region_psnr(estimate, reference, ~inside), \
            _region_psnr(estimate, reference, inside)

    print(f"# {args.case}: {layout.height}x{layout.width}, {int(held.sum())} held-out pixels in "
          f"{len(sampler.validation)} validation crop(s) of {patch}, validation every {trainer.validation_every}",
          flush=True)
    print("| iteration | learning-rate factor | validation loss | PSNR all | trained pixels | held-out pixels |")
    print("| --- | --- | --- | --- | --- | --- |")
    steps = trainer.run(args.iterations, None)
    best_psnr: dict[int, float] = {}
    try:
        while True:
            progress = next(steps)
            if progress.iteration % args.every == 0:
                if progress.validation_loss is not None:
                    validation = progress.validation_loss
                else:
                    with trainer.averaged_weights():
                        validation = trainer.validation_loss()
                scores = quality()
                best_psnr[progress.iteration] = scores[0]
                factor = trainer.optimizer.param_groups[0]["lr"] / config.learning_rate  # cooldown, runaways included
                print(f"| {progress.iteration} | {factor:.3f} | "
                      f"{validation:.6f} | {scores[0]:.2f} | {scores[1]:.2f} | {scores[2]:.2f} |", flush=True)
    except StopIteration as stop:
        summary = stop.value
    network.eval()
    with torch.no_grad():
        mean = network(image)[0, 0].numpy()
    estimate = analysis.normalizer.denormalize(mean[None])[0]
    print(f"\nkept: iteration {summary.best_iteration} (validation {summary.best_validation_loss:.6f}), "
          f"PSNR {psnr(estimate, clean.reshape(layout.height, layout.width)[:estimate.shape[0], :estimate.shape[1]]):.2f}")


def _region_psnr(estimate: np.ndarray, clean: np.ndarray, where: np.ndarray) -> float:
    if not where.any():
        return float("nan")
    data_range = clean.max() - clean.min()
    return float(10 * np.log10(data_range**2 / np.mean((estimate[where] - clean[where]) ** 2)))


if __name__ == "__main__":
    main()
