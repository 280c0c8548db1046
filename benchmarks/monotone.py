"""Quality against the iterations asked for, on small single images, up to what a GPU fits in a
minute: `tbsn denoise --preset small --iterations N` per cell (seeded, fixed iterations, so the
PSNR does not depend on the machine), with the iterations run and the one the kept weights are
from. A fit given more iterations should never come out worse.

    python benchmarks/monotone.py --cases D6,S1,S2 --iterations 400,1600,6400
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
    parser.add_argument("--cases", default="D6,S1,S2")
    parser.add_argument("--iterations", default="400,1600,6400")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--threads", default="2", help="fixed, so that a run repeats exactly whatever else runs")
    parser.add_argument("--options", default="", help="more `tbsn denoise` options, space-separated")
    args = parser.parse_args()

    counts = [int(n) for n in args.iterations.split(",")]
    rows = []
    for name in args.cases.split(","):
        case = CASES[name.strip()]
        clean, noisy = make_case(case)
        cells = []
        for count in counts:
            result = run_tbsn(noisy, case.axes, count, args.preset, "auto", "cpu", False, False, False,
                              ("--threads", args.threads, "--student", "off", *args.options.split()))
            cells.append((psnr(result["denoised"], clean), result["iterations"], result["kept"], result["seconds"]))
            print(f"# {case.name} {count}: {cells[-1][0]:.3f} dB, {cells[-1][1]} it, kept {cells[-1][2]}, "
                  f"{cells[-1][3]:.0f} s", flush=True)
        rows.append((case, psnr(noisy, clean), cells))

    print(f"\ntbsn denoise --preset {args.preset} --iterations N {args.options}; PSNR in dB (iterations run, "
          "kept weights from, seconds)")
    print("| case | noisy | " + " | ".join(f"{n} it" for n in counts) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in counts) + " |")
    for case, noisy, cells in rows:
        print(f"| {case.name} | {noisy:.2f} | " + " | ".join(f"{p:.2f} ({it}, kept {kept}, {s:.0f} s)"
                                                          for p, it, kept, s in cells) + " |")


if __name__ == "__main__":
    main()
