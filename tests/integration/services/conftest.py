"""Fixtures of the services' integration tests: the tiny model served by `tandem serve` in
each deployment, and the same model in Hugging Face transformers as the reference."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
import torch

from tandem.services.servers import free_port


@pytest.fixture(scope="module", params=["colocated", "cluster"])
def server(request, tiny_llama, tmp_path_factory):
    """The same API, served by one process or by the disaggregated stages."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    deployment = ["--colocated"] if request.param == "colocated" else []
    cmd = [
        sys.executable,
        "-m",
        "tandem.cli",
        "serve",
        "--model",
        tiny_llama,
        "--port",
        str(port),
        "--served-model-name",
        "tiny-llama",
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--num-gpu-blocks-override",
        "128",
        "--torch-threads",
        "1",
        *deployment,
    ]
    log = open(log_path, "wb")  # a file, not a pipe: nobody reads it while tests run
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    saw_503 = False
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "server did not become ready"
            try:
                r = httpx.get(f"{base}/health", timeout=2)
                if r.status_code == 200:
                    break
                saw_503 |= r.status_code == 503
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield base, saw_503
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def hf_llama(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
