# One image for every stage: the command picks it (its ENTRYPOINT is `tandem`):
#   docker run tandem:latest gateway|tokenizer|scheduler|prefill|decode [flags]
#   docker run -p 8000:8000 tandem:latest serve --host 0.0.0.0    # the whole cluster in one
#
#   docker build -t tandem:latest .                          # CPU (torch's CPU wheel)
#   docker build -t tandem:cuda --build-arg DEVICE=cuda .     # NVIDIA GPUs (torch's CUDA wheel)
#
# The build runs scripts/setup.sh and `tandem model prepare`: the same steps as `make serve`.
# The default model is prepared into the image (TANDEM_CACHE_DIR); PREPARE_MODEL=0 leaves it
# out, for a volume mounted there instead or any Hugging Face folder given with --model.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG DEVICE=cpu
ARG PREPARE_MODEL=1
ENV PYTHONUNBUFFERED=1 \
    VENV=/opt/tandem/.venv \
    TANDEM_CACHE_DIR=/var/lib/tandem \
    PATH=/opt/tandem/.venv/bin:$PATH

# A C++ compiler for the CPU kernels (tandem/kernels): they are built for the CPU that runs
# them, so on the first start of a worker (~30 s, then kept in TANDEM_CACHE_DIR), not here.
RUN if [ "$DEVICE" = cpu ]; then \
      apt-get update && apt-get install -y --no-install-recommends g++ \
      && rm -rf /var/lib/apt/lists/*; \
    fi

RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin tandem
WORKDIR /opt/tandem
COPY pyproject.toml README.md Makefile ./
COPY scripts ./scripts
COPY protos ./protos
COPY tandem ./tandem

RUN case "$DEVICE" in \
      cpu)  export TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu ;; \
      cuda) export TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 ;; \
      *)    echo "DEVICE must be cpu or cuda" >&2; exit 1 ;; \
    esac \
 && EXTRAS=prepare bash scripts/setup.sh \
 && rm -rf /root/.cache/pip

RUN mkdir -p "$TANDEM_CACHE_DIR" \
 && if [ "$PREPARE_MODEL" = 1 ]; then tandem model prepare; fi \
 && chown -R tandem:tandem "$TANDEM_CACHE_DIR"

USER tandem
# gateway API, tokenizer gRPC, the other stages' /health and /metrics (--health-port)
EXPOSE 8000 50051 8080
ENTRYPOINT ["tandem"]
CMD ["serve", "--host", "0.0.0.0"]
