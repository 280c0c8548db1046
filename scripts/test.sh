#!/usr/bin/env bash
# Run the test suite: installs the test extra into ./.venv (and Xvfb for the napari tests when
# it is missing), then runs pytest on a virtual display.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v xvfb-run >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq xvfb xauth libgl1-mesa-dri libegl1 libxkbcommon-x11-0 'libxcb-*' \
        libfontconfig1 libdbus-1-3 >/dev/null
fi
bash scripts/install.sh test
xvfb-run -a .venv/bin/python -m pytest -q "$@"
