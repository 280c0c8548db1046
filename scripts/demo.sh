#!/usr/bin/env bash
# Install napari-tbsn into ./.venv (CPU torch) and denoise the bundled sample stack.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/tbsn sample -o demo_out
.venv/bin/tbsn denoise demo_out/noisy.tif -o demo_out/denoised.tif --preset tiny --time-budget 60 \
    --save-model demo_out/model.safetensors
.venv/bin/python - <<'PY'
import numpy as np, tifffile
clean, noisy, denoised = (tifffile.imread(f"demo_out/{n}.tif") for n in ("clean", "noisy", "denoised"))
psnr = lambda x: 10 * np.log10((clean.max() - clean.min()) ** 2 / np.mean((x - clean) ** 2))
print(f"PSNR against the clean reference: noisy {psnr(noisy):.2f} dB -> denoised {psnr(denoised):.2f} dB")
PY
