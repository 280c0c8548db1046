"""Multichannel fitting: the same data fitted with its channels joint, independent and auto
(one run each, one after the other in this process), with BM3D + VST per channel after.

    python benchmarks/channels.py --case D5 --budget 300
    python benchmarks/channels.py --case D5 --iterations 870   # a fixed length instead of a time
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import CASES, make_case, psnr  # noqa: E402
from quality import run_bm3d, run_tbsn  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="D5")
    parser.add_argument("--budget", type=float, default=300.0, help="fitting seconds")
    parser.add_argument("--iterations", type=int, help="fit this many iterations instead of --budget seconds")
    parser.add_argument("--modes", default="joint,independent,auto")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-bm3d", action="store_true")
    args = parser.parse_args()

    case = CASES[args.case]
    clean, noisy = make_case(case)
    channel_axis = case.axes.index("C")
    length = args.iterations if args.iterations else args.budget
    rows = []
    for mode in args.modes.split(","):
        result = run_tbsn(noisy, case.axes, length, args.preset, "auto", args.device, False, False, False,
                          ("--channels", mode))
        denoised = result["denoised"]
        per_channel = [psnr(np.take(denoised, c, channel_axis), np.take(clean, c, channel_axis))
                       for c in range(clean.shape[channel_axis])]
        training = result["report"]["training"]
        rows.append((f"napari-tbsn --channels {mode}", psnr(denoised, clean), per_channel,
                     f"{training['iterations']} it; {training.get('channels')}"))
        print(f"# {rows[-1]}", flush=True)
    if not args.no_bm3d:
        try:
            estimate, seconds = run_bm3d(noisy, case)
            rows.append((f"BM3D + VST ({seconds:.0f} s)", psnr(estimate, clean),
                         [psnr(np.take(estimate, c, channel_axis), np.take(clean, c, channel_axis))
                          for c in range(clean.shape[channel_axis])], ""))
        except ImportError:
            pass
    print(f"\n{case.name} ({case.axes} {'x'.join(map(str, noisy.shape))}, noisy {psnr(noisy, clean):.2f} dB), "
          f"fitting {f'{length} iterations' if args.iterations else f'{length:g} s'}, preset {args.preset}; PSNR in dB")
    print("| method | PSNR | per channel | fit |")
    print("| --- | --- | --- | --- |")
    for name, total, per_channel, note in rows:
        print(f"| {name} | {total:.2f} | {' / '.join(f'{v:.2f}' for v in per_channel)} | {note} |")


if __name__ == "__main__":
    main()
