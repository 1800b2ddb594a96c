#!/usr/bin/env bash
# The GPU path on a machine with one NVIDIA GPU, in under 5 minutes, stage by stage
# (scripts/gpu_check.py says what each checks). The machine may have no network: the
# project runs from this tree over the machine's own torch and triton, and what else it
# lacks comes as wheels in .whl/ (fetched beforehand with scripts/gpu_wheels.sh).
#   scripts/gpu_check.sh [STAGE ...]     figures in $OUT/gpu_check.json (or ./gpu_check.json)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="/tmp/site/bin:$PATH"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python3 scripts/gpu_check.py "$@"
