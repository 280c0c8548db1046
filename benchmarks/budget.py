"""Quality against fitting time: PSNR after fitting budgets of 150, 300, 600 and 1200 s, one run
each, one after the other in this process (`tbsn denoise` with defaults, as a user would run it).
A longer fit should never be worse than a shorter one by more than the noise of one run.

    python benchmarks/budget.py --cases D1,D6,D2 --budgets 150,300,600,1200
    python benchmarks/budget.py --cases D1 --budgets 600 --seeds 0,1,2 --plain   # one fit's spread

With several seeds each cell lists every run (then their mean); with --plain each run also gives
the plain blind-spot mean of the same model, which tells a spread of the network's own estimate
from one of the posterior and lattice refinement fitted after it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import CASES, make_case, psnr  # noqa: E402
from quality import run_tbsn  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="D1,D6,D2")
    parser.add_argument("--budgets", default="150,300,600,1200", help="fitting seconds")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seeds", default="0", help="one run per seed and cell, e.g. 0,1,2")
    parser.add_argument("--plain", action="store_true", help="also the plain blind-spot mean of each run")
    args = parser.parse_args()

    budgets = [float(b) for b in args.budgets.split(",")]
    seeds = [int(seed) for seed in args.seeds.split(",")]
    print(f"tbsn denoise --preset {args.preset} --time-budget B; PSNR in dB (one run per cell and seed); "
          "iterations run, and where the kept weights are from")
    print("| case | shape | noisy | " + " | ".join(f"{b:g} s" for b in budgets) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in budgets) + " |")
    for name in args.cases.split(","):
        case = CASES[name.strip()]
        clean, noisy = make_case(case)
        cells = []
        for budget in budgets:
            runs, values = [], []
            for seed in seeds:
                result = run_tbsn(noisy, case.axes, budget, args.preset, "auto", args.device, False, args.plain, False,
                                  ("--seed", str(seed)))
                training = result["report"]["training"]
                values.append(psnr(result["denoised"], clean))
                plain = f", plain {psnr(result['plain'], clean):.2f}" if "plain" in result else ""
                runs.append(f"{values[-1]:.2f} ({training['iterations']} it, kept "
                            f"{training['best_iteration']}{_plateau(training)}{plain})")
                print(f"# {case.name} {budget:g} s, seed {seed}: {runs[-1]}, {result['seconds']:.0f} s in all",
                      flush=True)
            cells.append("; ".join(runs) + (f"; mean {sum(values) / len(values):.2f}" if len(values) > 1 else ""))
        print(f"| {case.name} | {'x'.join(map(str, noisy.shape))} | {psnr(noisy, clean):.2f} | " + " | ".join(cells)
              + " |", flush=True)


def _plateau(training: dict) -> str:
    plateau = training.get("plateau_iteration")
    return f", stopped improving at {plateau}" if plateau else ""


if __name__ == "__main__":
    main()
