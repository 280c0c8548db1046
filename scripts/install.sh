#!/usr/bin/env bash
# Install napari-tbsn into ./.venv with the CPU build of torch; `install.sh test` adds the test extra.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# The CPU build of torch first, or pip pulls a multi-GB CUDA build; for a GPU install the CUDA
# build that suits your driver instead.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0" \
    || .venv/bin/pip install -q "torch>=2.4"
.venv/bin/pip install -q -e ".${1:+[$1]}"
