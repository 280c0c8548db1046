#!/usr/bin/env bash
# Prove a GPU machine in about 8 minutes: CUDA tests, speed, compile, targets, quality, DDP and a
# GPU cluster worker (benchmarks/gpu_check.py). The report, gpu_check.md, goes into $OUT when
# that is set, else here. Without a GPU it runs its CPU half. Assumes `bash scripts/install.sh test`
# (or any environment with napari-tbsn[test] and a CUDA build of torch) in ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" benchmarks/gpu_check.py "$@"
