#!/usr/bin/env bash
# Set up fedseg in ./.venv (idempotent). torch comes first and pinned: `pip install torch==2.13.0`
# takes the CPU build; letting a dependency pull torch would fetch a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[dev]"
echo "fedseg is set up: .venv/bin/fedseg --help"
