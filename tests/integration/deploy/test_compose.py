"""docker-compose.yml, run for real without a Docker engine: each service's command and
environment, with its service host names mapped to loopback and its ports (`expose`) to free
ones, started as a local process in `depends_on` order, each dependency's own health check
passing first. Then a completion through the gateway, and a decode replica joining and
another draining while requests stream."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tandem.services.servers import free_port, nats_server_binary, redis_server_binary
from tests.helpers.paths import REPO_ROOT

TANDEM_IMAGE = "tandem:latest"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "0.0.0.0")


def _redis_cli() -> str:
    return str(Path(redis_server_binary()).with_name("redis-cli"))


# What the images' executables are on this machine.
EXECUTABLES = {
    "nats-server": nats_server_binary,
    "redis-server": redis_server_binary,
    "redis-cli": _redis_cli,
    "python": lambda: sys.executable,
    "wget": lambda: shutil.which("wget"),
}


def interpolate(text: str) -> str:
    """Compose's `${VAR:-default}` and `${VAR}`, from this process's environment."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: os.environ.get(m[1]) or m[2] or "", text)


class LocalCompose:
    """The services of a compose file as local processes (replicas numbered from 0)."""

    def __init__(self, spec: dict, scratch: Path) -> None:
        self.services: dict = spec["services"]
        self.scratch = scratch
        self.ports: dict[tuple[str, int, str], int] = {}
        self.procs: dict[tuple[str, int], subprocess.Popen] = {}

    def port(self, service: str, replica: int, port: str) -> int:
        key = (service, replica, port)
        if key not in self.ports:
            self.ports[key] = free_port()
        return self.ports[key]

    def _expose(self, service: str) -> list[str]:
        return [str(p) for p in self.services[service].get("expose", [])]

    def _paths(self, service: str) -> dict[str, str]:
        """Container path -> local path, from the service's volumes."""
        out = {}
        for volume in self.services[service].get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):  # a bind mount of a file in this repository
                out[target] = str(REPO_ROOT / source)
            else:  # a named volume
                (self.scratch / source).mkdir(exist_ok=True)
                out[target] = str(self.scratch / source)
        return out

    def rewrite(self, text: str, service: str, replica: int) -> str:
        """A command word or environment value as it reads on loopback."""
        text = interpolate(str(text))
        exposed = self._expose(service)

        def host_port(m: re.Match) -> str:
            host, port = m[1], m[2]
            if host in self.services:  # another service: its first replica
                return f"127.0.0.1:{self.port(host, 0, port)}"
            if host in LOCAL_HOSTS and port in exposed:
                return f"127.0.0.1:{self.port(service, replica, port)}"
            return m[0]

        text = re.sub(r"([A-Za-z0-9_.-]+):(\d+)", host_port, text)
        if text in exposed:  # a port it listens on
            return str(self.port(service, replica, text))
        return self._paths(service).get(text, text)

    def argv(self, service: str, words: list[str], replica: int, entrypoint: bool) -> list[str]:
        """A command (after the image's entrypoint when `entrypoint`) as a local argv."""
        words = [self.rewrite(w, service, replica) for w in words]
        if entrypoint and self.services[service].get("image") == TANDEM_IMAGE:
            return [sys.executable, "-m", "tandem.cli", *words]  # ENTRYPOINT ["tandem"]
        exe = EXECUTABLES[words[0]]()
        assert exe, f"{words[0]} is not on this machine"
        return [exe, *words[1:]]

    def start(self, service: str, replica: int = 0, extra: tuple = ()) -> subprocess.Popen:
        """Start one replica (`extra`: flags after its command, for tests of them)."""
        spec = self.services[service]
        env = {k: self.rewrite(v, service, replica) for k, v in spec.get("environment", {}).items()}
        log = open(self.scratch / f"{service}-{replica}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            self.argv(service, [*spec["command"], *extra], replica, entrypoint=True),
            env=os.environ | env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[service, replica] = proc
        return proc

    def healthy(self, service: str, replica: int = 0) -> bool:
        """The service's own health check passes."""
        test = self.services[service]["healthcheck"]["test"]
        assert test[0] == "CMD", test
        argv = self.argv(service, test[1:], replica, entrypoint=False)
        return subprocess.run(argv, capture_output=True, timeout=10).returncode == 0

    def wait_healthy(self, service: str, replica: int = 0, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy(service, replica):
            proc = self.procs[service, replica]
            assert proc.poll() is None, f"{service} exited:\n{self.log(service, replica)}"
            assert time.monotonic() < deadline, f"{service} unhealthy:\n{self.log(service)}"
            time.sleep(0.5)

    def log(self, service: str, replica: int = 0) -> str:
        return (self.scratch / f"{service}-{replica}.log").read_text(errors="replace")[-3000:]

    def up(self, services: list[str]) -> None:
        """Start each service once every dependency it waits on is healthy."""
        started: set[str] = set()

        def start(service: str) -> None:
            if service in started:
                return
            depends = self.services[service].get("depends_on", {})
            for dep, cond in depends.items() if isinstance(depends, dict) else []:
                start(dep)
                if cond.get("condition") == "service_healthy":
                    self.wait_healthy(dep)
            self.start(service)
            started.add(service)

        for service in services:
            start(service)

    def down(self) -> None:
        """Stop everything, the last started first (as compose does)."""
        for proc in reversed(self.procs.values()):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def default_services(spec: dict) -> list[str]:
    """What `docker compose up` starts: every service outside a profile."""
    return [name for name, s in spec["services"].items() if not s.get("profiles")]


@pytest.fixture(scope="module")
def compose(tmp_path_factory):
    spec = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    cluster = LocalCompose(spec, tmp_path_factory.mktemp("compose"))
    try:
        cluster.up(default_services(spec))
        cluster.wait_healthy("gateway")
        yield cluster
    finally:
        cluster.down()


def gateway_url(compose: LocalCompose) -> str:
    return f"http://127.0.0.1:{compose.port('gateway', 0, '8000')}"


def decode_workers(url: str) -> dict[str, dict]:
    workers = httpx.get(f"{url}/stats", timeout=5).json()["workers"]
    return {k: w for k, w in workers.items() if w["role"] == "decode"}


def test_every_stage_healthy_and_a_completion_goes_through(compose):
    for service in default_services({"services": compose.services}):
        assert compose.healthy(service), f"{service} unhealthy:\n{compose.log(service)}"
    url = gateway_url(compose)
    body = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8
    metrics = httpx.get(f"http://127.0.0.1:{compose.port('decode', 0, '8080')}/metrics").text
    assert "tandem:engine_steps_total" in metrics  # a worker's own /metrics on its health port


async def _complete(url: str, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    async with httpx.AsyncClient(timeout=120) as client:
        r = await client.post(f"{url}/v1/completions", json=body)
        return {"status": r.status_code, "body": r.json()}


def test_a_decode_replica_joins_and_another_drains_without_losing_a_request(compose):
    """`docker compose up --scale decode=2`, then `docker compose stop` of the first one,
    while requests stream."""
    url = gateway_url(compose)
    before = set(decode_workers(url))
    second = compose.start("decode", replica=1)
    compose.wait_healthy("decode", replica=1)
    deadline = time.monotonic() + 30
    while len(decode_workers(url)) < 2:  # it announces itself by heartbeat: nothing else
        assert time.monotonic() < deadline, "the new decode worker never joined"
        time.sleep(0.2)
    (new_id,) = set(decode_workers(url)) - before

    async def scenario() -> tuple[list[dict], list[dict]]:
        prompts = [f"Request {i} tells a story about the sea:" for i in range(6)]
        first = [asyncio.create_task(_complete(url, p, 48)) for p in prompts]
        deadline = time.monotonic() + 60
        while not all(w["num_running"] for w in decode_workers(url).values()):
            assert time.monotonic() < deadline, "requests never reached both decode workers"
            await asyncio.sleep(0.1)
        os.killpg(compose.procs["decode", 0].pid, signal.SIGTERM)  # `docker compose stop`
        await asyncio.sleep(0.5)
        later = [asyncio.create_task(_complete(url, p, 16)) for p in prompts[:3]]
        return await asyncio.gather(*first), await asyncio.gather(*later)

    first, later = asyncio.run(scenario())
    for result in (*first, *later):
        assert result["status"] == 200, result
    assert [r["body"]["usage"]["completion_tokens"] for r in first] == [48] * 6
    assert [r["body"]["usage"]["completion_tokens"] for r in later] == [16] * 3
    assert compose.procs["decode", 0].wait(30) == 0  # drained and left cleanly
    assert second.poll() is None
    workers = decode_workers(url)
    assert workers[new_id]["num_steps"] > 0 and not workers[new_id]["draining"]


def test_a_worker_out_of_shutdown_time_hands_its_requests_back(compose):
    """SIGTERM with --shutdown-timeout 0: its running requests go back to the scheduler with
    their tokens and finish on another decode worker, streams unbroken."""
    url = gateway_url(compose)
    before = set(decode_workers(url))
    proc = compose.start("decode", replica=2, extra=("--shutdown-timeout", "0"))
    compose.wait_healthy("decode", replica=2)
    deadline = time.monotonic() + 30
    while len(set(decode_workers(url)) - before) < 1:
        assert time.monotonic() < deadline, "the new decode worker never joined"
        time.sleep(0.2)
    (new_id,) = set(decode_workers(url)) - before

    async def scenario() -> list[dict]:
        prompts = [f"Write item {i} of a long list of colours:" for i in range(6)]
        tasks = [asyncio.create_task(_complete(url, p, 64)) for p in prompts]
        deadline = time.monotonic() + 60
        while not decode_workers(url)[new_id]["num_running"]:
            assert time.monotonic() < deadline, "no request reached the new worker"
            await asyncio.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)
        return await asyncio.gather(*tasks)

    results = asyncio.run(scenario())
    for result in results:
        assert result["status"] == 200, result
        assert result["body"]["choices"][0]["finish_reason"] == "length"
        assert result["body"]["usage"]["completion_tokens"] == 64
    assert proc.wait(30) == 0
    assert "handed" in compose.log("decode", 2) and "back to the scheduler" in compose.log(
        "decode", 2
    )
