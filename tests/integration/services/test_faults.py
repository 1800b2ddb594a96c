"""Faults injected into a real cluster (1 prefill + 2 decode workers): a decode worker killed
with SIGKILL mid-stream, the prefill worker killed, NATS restarted. Every request either
completes correctly (a worker's death costs its requests a re-prefill, not a token) or ends
with an explicit error within a bound (NATS restarting under them: 503), and afterwards every
worker's blocks are all free."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import pytest
import redis

from tandem.bench.deploy import children, proc_argv, server_root
from tandem.bench.elastic import cluster_workers
from tandem.services.scheduler.prefix_index import BLOCK_KEY, WORKER_KEY
from tandem.services.servers import start_redis
from tests.helpers.cluster import assert_all_blocks_free, start_cluster, stop_cluster
from tests.helpers.faults import reference, run_with_fault, stats, wait_for


@pytest.fixture(scope="module")
def redis_server():
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster_and_log(tiny_llama, tmp_path_factory, redis_server):
    """The cluster on a Redis of the test's own, so that the index can be read."""
    log = tmp_path_factory.mktemp("faults") / "cluster.log"
    proc, base = start_cluster(
        tiny_llama, "--max-model-len", "256", "--num-gpu-blocks-override", "256",
        "--decode-workers", "2", "--worker-placement", "shared",
        "--max-local-prefill-length", "0",  # test_local_prefill.py: a decode worker's own
        log_path=log, env={"REDIS_URL": redis_server.url},
    )  # fmt: skip
    try:
        yield base, log
    finally:
        stop_cluster(proc)
        for extra in STARTED_BY_TESTS:  # a NATS server restarted by hand is not the launcher's
            extra.kill()
            extra.wait()


STARTED_BY_TESTS: list[subprocess.Popen] = []


@pytest.fixture(scope="module")
def cluster(cluster_and_log):
    return cluster_and_log[0]


def indexed_workers(redis_url: str) -> set[str]:
    """Every worker id the prefix index names, in its per-block sets or its per-worker sets."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        named = {key.removeprefix(WORKER_KEY) for key in r.scan_iter(WORKER_KEY + "*")}
        for key in r.scan_iter(BLOCK_KEY + "*"):
            named |= r.smembers(key)
        return named
    finally:
        r.close()


def assert_index_names_only_live_workers(base: str, redis_url: str) -> None:
    wait_for(lambda: indexed_workers(redis_url) <= set(stats(base)), 10,
              "the prefix index names a dead worker")  # fmt: skip


def _prompts(tag: str) -> list[str]:
    return [f"{tag} request number {i} says" for i in range(4)]


def test_a_decode_worker_killed_mid_stream_loses_no_request_and_no_token(
    cluster_and_log, redis_server
):
    cluster, log = cluster_and_log
    prompts = _prompts("kill9")
    expected = reference(cluster, prompts)
    assert indexed_workers(redis_server.url)  # the workers' blocks are in the index
    victim = {}
    # a heartbeat of the reference's last moments may still say "running": the victim must
    # be running requests of this load, which it shows by having received their KV
    received = {k: w["num_kv_blocks_received"] for k, w in stats(cluster).items()}

    def kill_a_busy_decode_worker():
        def busy():
            running = {k: w for k, w in stats(cluster).items()
                       if w["role"] == "decode" and w["num_running"] >= 1
                       and w["num_kv_blocks_received"] > received.get(k, 0)}  # fmt: skip
            victim.update(running)
            return bool(running)

        wait_for(busy, 60, "no decode worker got requests")
        worker_id = sorted(victim)[0]
        os.kill(cluster_workers(cluster)[worker_id].pid, signal.SIGKILL)
        victim.clear()
        victim[worker_id] = True

    results = run_with_fault(cluster, prompts, kill_a_busy_decode_worker)
    for result, tokens in zip(results, expected):
        assert result["status"] == 200, result
        assert result["body"]["choices"][0]["token_ids"] == tokens  # nothing repeated or lost
    (dead,) = victim
    assert f"{dead} lost: " in log.read_text()  # its requests were re-queued mid-stream
    # the launcher started the worker again, under a new id
    wait_for(lambda: f"{dead}.1" in stats(cluster), 120, "the worker was not restarted")
    wait_for(lambda: dead not in cluster_workers(cluster), 10, "the old id lingers")
    assert_all_blocks_free(cluster)
    assert dead not in indexed_workers(redis_server.url)
    assert_index_names_only_live_workers(cluster, redis_server.url)


def test_the_prefill_worker_killed_mid_plan_loses_no_request(cluster, redis_server):
    prompts = _prompts("prefill-kill")
    expected = reference(cluster, prompts)

    def kill_prefill():
        prefill = next(k for k in cluster_workers(cluster) if k.startswith("prefill"))
        os.kill(cluster_workers(cluster)[prefill].pid, signal.SIGKILL)

    results = run_with_fault(cluster, prompts, kill_prefill)
    for result, tokens in zip(results, expected):
        assert result["status"] == 200, result
        assert result["body"]["choices"][0]["token_ids"] == tokens
    assert_all_blocks_free(cluster, timeout=60)
    assert_index_names_only_live_workers(cluster, redis_server.url)


def test_nats_restarted_new_requests_succeed_within_seconds(cluster):
    """In-flight requests complete or fail explicitly; new ones succeed once NATS is back."""
    nats = next(p for p in cluster_workers_and_servers(cluster) if "nats-server" in p[1][0])
    pid, argv = nats

    def restart_nats():
        wait_for(lambda: any(w["num_running"] for w in stats(cluster).values()), 30,
                  "the requests never started")  # fmt: skip
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        STARTED_BY_TESTS.append(subprocess.Popen(argv, start_new_session=True,
                                                 stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.DEVNULL))  # fmt: skip

    results = run_with_fault(cluster, _prompts("nats"), restart_nats)
    for result in results:  # completed, or an explicit error
        assert result["status"] in (200, 503), result
    start = time.monotonic()
    r = httpx.post(cluster + "/v1/completions",
                   json={"prompt": "back?", "max_tokens": 4}, timeout=30)  # fmt: skip
    assert r.status_code == 200 and time.monotonic() - start < 15, r.text
    assert_all_blocks_free(cluster, timeout=60)


def cluster_workers_and_servers(base: str) -> list[tuple[int, list[str]]]:
    """(pid, argv) of the launcher's children: its stages, NATS and Redis."""
    return [(pid, proc_argv(pid)) for pid in children(server_root(base))]
