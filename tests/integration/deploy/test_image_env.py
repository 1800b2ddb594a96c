"""The container image's environment: Tandem installed the way the Dockerfile installs it
(scripts/setup.sh with the image's extras alone, no `dev`) into a virtualenv of its own.
Every command starts from it, and it serves a completion through the whole cluster.

The virtualenv is kept between runs under Tandem's cache, keyed by what decides its
packages (pyproject.toml's dependencies and extras, setup.sh): it costs minutes once."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from tandem.model_prep import cache_dir, find_gguf
from tandem.services.servers import free_port
from tests.helpers.paths import REPO_ROOT

IMAGE_EXTRAS = re.search(r"EXTRAS=(\w+) bash scripts/setup.sh",
                         (REPO_ROOT / "Dockerfile").read_text()).group(1)  # fmt: skip
COMMANDS = [["serve"], ["gateway"], ["tokenizer"], ["scheduler"], ["prefill"], ["decode"],
            ["trace"], ["model", "prepare"], ["kernels", "build"], ["bench", "offline"],
            ["bench", "serve"], ["bench", "profile"], ["plan"]]  # fmt: skip


def _key() -> str:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = {
        "python": sys.version.split()[0],
        "dependencies": project["dependencies"],
        "extras": {e: project["optional-dependencies"][e] for e in IMAGE_EXTRAS.split(",")},
        "setup": (REPO_ROOT / "scripts" / "setup.sh").read_text(),
    }
    return hashlib.sha256(json.dumps(pins, sort_keys=True).encode()).hexdigest()[:16]


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without its virtualenv (nor the test run's paths)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return env | extra


@pytest.fixture(scope="module")
def image_venv() -> Path:
    root = cache_dir() / "test-venvs"
    venv = root / f"image-{_key()}"
    if not (venv / ".ready").is_file():
        for old in root.glob("image-*"):  # made for other pins
            shutil.rmtree(old, ignore_errors=True)
        subprocess.run(
            ["bash", "scripts/setup.sh"],
            cwd=REPO_ROOT,
            env=_clean_env(VENV=str(venv), EXTRAS=IMAGE_EXTRAS, PYTHON=sys.executable),
            check=True,
            timeout=1800,
        )
        (venv / ".ready").touch()
    python = venv / "bin" / "python"
    where = subprocess.run([python, "-c", "import tandem; print(tandem.__file__)"],
                           capture_output=True, text=True, env=_clean_env(), cwd="/")  # fmt: skip
    if not where.stdout.startswith(str(REPO_ROOT)):  # made from another checkout: point it here
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "-e", REPO_ROOT],
                       check=True, env=_clean_env(), timeout=600)  # fmt: skip
    return venv


def test_the_image_installs_no_test_dependency(image_venv):
    dev = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["dev"]
    names = [re.split(r"[<>=\[ ]", d)[0] for d in dev]
    code = "import importlib.metadata as m, sys\n" + "".join(
        f"\ntry:\n    m.version({n!r}); print({n!r})\nexcept m.PackageNotFoundError:\n    pass"
        for n in names
    )
    present = subprocess.run([image_venv / "bin" / "python", "-c", code], capture_output=True,
                             text=True, env=_clean_env(), check=True).stdout.split()  # fmt: skip
    # Some are pulled in by the image's own packages; none of the test tools may be.
    assert not {"pytest", "schemathesis", "ruff", "openai"} & set(present), present


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_starts_in_the_image(image_venv, command):
    run = subprocess.run([image_venv / "bin" / "tandem", *command, "--help"],
                         capture_output=True, text=True, env=_clean_env(), cwd="/",
                         timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "usage: tandem" in run.stdout


def _a_gguf_file() -> Path:
    """The packaged GGUF under a path of its own (kept: its conversion is done once)."""
    path = cache_dir() / "test-models" / "SmolLM2-135M.Q4_1.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(find_gguf(), path)
        except OSError:
            shutil.copyfile(find_gguf(), path)
    return path


def test_the_image_serves_a_gguf_file_given_as_the_model(image_venv, tmp_path):
    """`tandem serve FILE.gguf` (converted on first use) through the whole cluster."""
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [image_venv / "bin" / "tandem", "serve", str(_a_gguf_file()), "--port", str(port),
         "--torch-threads", "1", "--max-model-len", "256", "--num-gpu-blocks-override", "64"],
        stdout=log, stderr=subprocess.STDOUT, cwd="/",
        env=_clean_env(PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # the first run converts the file (~30 s)
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        r = httpx.post(f"{base}/v1/completions", timeout=60,
                       json={"prompt": "The capital of France is", "max_tokens": 4,
                             "temperature": 0})  # fmt: skip
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "SmolLM2-135M.Q4_1"  # the file's name, as it was given
        assert body["usage"]["completion_tokens"] == 4 and body["choices"][0]["text"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
