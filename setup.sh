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
# pip byte-compiles every file it installs, one at a time; compileall does the same work on
# every core (a fresh setup: 111 s -> 71 s, both beside other jobs at load 3, 2026-12-06).
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q --no-compile torch==2.13.0
.venv/bin/pip install -q --no-compile -e ".[dev]"
.venv/bin/python -m compileall -q -j 0 .venv/lib >/dev/null 2>&1 || true  # a few test files fail
# A deployment's coordinator fronts its SuperLink with nginx (fedseg deploy superlink); the
# deployment test needs it too. Installed from Debian's packages when we may, else say so.
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -q nginx-light >/dev/null 2>&1 \
      || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q nginx-light >/dev/null 2>&1) \
      || echo "note: could not install nginx; the deployment test will be skipped"
  else
    echo "note: nginx not found (the coordinator of a deployment needs it: apt-get install nginx-light)"
  fi
fi
echo "fedseg is set up: .venv/bin/fedseg --help"
