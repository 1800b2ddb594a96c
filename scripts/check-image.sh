#!/usr/bin/env bash
# Build the image and serve one completion from the compose cluster built from it. Needs a
# container engine (Docker with compose, or Podman with podman-compose: ENGINE=podman);
# not part of `make test`, whose test_image_env.py checks the image's environment without one.
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINE=${ENGINE:-docker}
COMPOSE=${COMPOSE:-"$ENGINE compose"}
PORT=${PORT:-8000}

$ENGINE build -t tandem:latest .
$ENGINE run --rm tandem:latest --help > /dev/null
for stage in gateway tokenizer scheduler prefill decode; do
  $ENGINE run --rm tandem:latest "$stage" --help > /dev/null
done
trap '$COMPOSE down --remove-orphans' EXIT
$COMPOSE up -d
for _ in $(seq 1 180); do
  if curl -fs "http://127.0.0.1:$PORT/health" > /dev/null; then break; fi
  sleep 1
done
curl -fs "http://127.0.0.1:$PORT/v1/completions" -H 'content-type: application/json' \
  -d '{"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}'
echo
echo "image ok: built, every stage starts, the compose cluster serves"
