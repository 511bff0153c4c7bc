#!/usr/bin/env bash
# Create (or reuse) .venv and install the project with all extras. `--browser` also installs
# Debian's headless Chromium, which the map test uses.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# pip byte-compiles what it installs on one core (57 s of a 132 s setup, measured on the 2-core VM);
# compileall does the same on every core (35-40 s). The excluded file is Python 3.12 syntax in torch's tests.
.venv/bin/python -m pip install --quiet --no-compile -e ".[all]"
.venv/bin/python -m compileall -q -j 0 -x 'torch/testing/_internal/py312_' .venv/lib/python3*/site-packages >/dev/null
.venv/bin/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (magseg-nb)" >/dev/null
if [ "${1:-}" = "--browser" ] && ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 \
    || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y --no-install-recommends chromium >/dev/null; }
fi
echo "setup: .venv ready ($(.venv/bin/python --version))"
