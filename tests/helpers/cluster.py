"""`tandem serve` started and stopped as a subprocess, and what every run checks at its end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from tandem.services.servers import free_port


def start_cluster(
    model: str,
    *flags: str,
    timeout: float = 180.0,
    env: dict | None = None,
    log_path=None,
):
    """`tandem serve` with these flags; its output goes to `log_path` (default: nowhere)."""
    port = free_port()
    cmd = [sys.executable, "-m", "tandem.cli", "serve", "--model", model, "--port", str(port),
           "--dtype", "float32", "--torch-threads", "1", *flags]  # fmt: skip
    log = open(log_path or os.devnull, "wb")
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=os.environ | (env or {}),
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "tandem serve exited during start-up"
        assert time.monotonic() < deadline, "cluster did not become healthy"
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def stop_cluster(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def group_is_gone(pgid: int, timeout: float = 10.0) -> bool:
    """True once no process of the launcher's group (every stage, NATS, Redis) is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def assert_all_blocks_free(base: str, timeout: float = 10.0) -> None:
    """Every worker (or the one engine) ends with nothing running and every block free."""
    deadline = time.monotonic() + timeout
    while True:
        workers = httpx.get(base + "/stats").json()["workers"]
        idle = all(
            w["num_running"] == 0
            and w["num_waiting"] == 0
            and w["num_free_blocks"] == w["num_blocks"]
            for w in workers.values()
        )
        if (workers and idle) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert workers and idle, workers


def kv_transfers(base: str, at_least: int, timeout: float = 10.0) -> dict:
    """The cluster's KV hand-off figures once its heartbeats count `at_least` of them."""
    deadline = time.monotonic() + timeout
    while True:
        kv = httpx.get(base + "/stats").json()["kv_transfer"]
        if kv["num_transfers"] >= at_least or time.monotonic() > deadline:
            return kv
        time.sleep(0.2)
