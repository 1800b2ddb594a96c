"""Cluster-wide prefix caching for real: workers' KV events keep a Redis index true, the
scheduler routes a request to the workers holding its prefix, the prefill worker computes
only the uncached suffix and the decode worker receives only the blocks it lacks. Outputs
never change, tenants (cache_salt) never share, and losing Redis costs hits, not requests."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import torch

from tandem.engine.block_pool import extend_block_hashes
from tandem.engine.llm import LLM
from tandem.engine.request import SamplingParams
from tandem.services.scheduler.prefix_index import PrefixIndex
from tandem.services.servers import free_port, start_redis
from tests.helpers.cluster import assert_all_blocks_free, start_cluster, stop_cluster

BLOCK = 16


@pytest.fixture(scope="module")
def redis_port():
    return free_port()


@pytest.fixture(scope="module")
def cluster(tiny_llama, redis_port):
    redis = start_redis(redis_port)
    proc, base = start_cluster(
        tiny_llama,
        "--prefill-workers", "2", "--decode-workers", "2", "--worker-placement", "shared",
        "--num-gpu-blocks-override", "48", "--max-model-len", "512",
        "--max-local-prefill-length", "0",  # routing between prefill workers is the subject
        env={"REDIS_URL": redis.url},
    )  # fmt: skip
    yield base, redis
    stop_cluster(proc)
    redis.stop()


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return LLM(tiny_llama, dtype="float32", max_model_len=512, enable_prefix_caching=False)


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _complete(base: str, prompt: list[int], **extra) -> dict:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, **extra}
    r = httpx.post(base + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _expected(reference: LLM, prompt: list[int]) -> str:
    params = SamplingParams(max_tokens=8, temperature=0.0)
    return reference.generate([prompt], params)[0].outputs[0].text


def _workers(base: str) -> dict:
    return httpx.get(base + "/stats").json()["workers"]


def _settled(base: str) -> dict:
    """Worker stats once every worker is idle and has heartbeated since."""
    assert_all_blocks_free(base)
    time.sleep(0.6)  # one more heartbeat: the counters are current
    return _workers(base)


def _lookup(redis_url: str, prompt: list[int], salt: str | None = None) -> dict[str, int]:
    hashes: list[int] = []
    extend_block_hashes(hashes, prompt, BLOCK, salt)

    async def go():
        index = PrefixIndex(redis_url)
        try:
            return await index.lookup(hashes)
        finally:
            await index.close()

    return asyncio.run(go())


def _eventually(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_index_names_the_workers_holding_a_requests_blocks(cluster, reference):
    base, redis = cluster
    prompt = _prompt(1, 200)  # 12 full blocks
    assert _complete(base, prompt)["choices"][0]["text"] == _expected(reference, prompt)
    holders = _eventually(lambda: _lookup(redis.url, prompt))
    roles = sorted(w.split("-")[0] for w, n in holders.items() if n == 12)
    assert roles == ["decode", "prefill"], holders

    def scheduler() -> dict:
        stats = httpx.get(base + "/stats").json()["scheduler"]
        return stats if stats.get("num_index_lookups") else {}

    scheduler = _eventually(scheduler)
    assert scheduler["index_available"] and scheduler["num_index_lookups"] >= 1
    assert 0 < scheduler["index_lookup_p50_ms"] < 50


def test_shared_prefix_goes_where_it_is_cached_and_only_the_suffix_is_computed(cluster, reference):
    base, redis = cluster
    prefix = _prompt(2, 192)  # 12 blocks
    first = prefix + _prompt(3, 20)
    _complete(base, first)
    _eventually(lambda: _lookup(redis.url, first))
    before = _settled(base)
    second = prefix + _prompt(4, 20)
    assert _complete(base, second)["choices"][0]["text"] == _expected(reference, second)
    after = _settled(base)
    hits = {w: after[w]["prefix_cache_hits"] - before[w]["prefix_cache_hits"] for w in after}
    prefill_hits = sorted(n for w, n in hits.items() if w.startswith("prefill"))
    assert prefill_hits == [0, 192], hits  # one worker served the prefix from its cache
    received = sum(
        after[w]["num_kv_blocks_received"] - before[w]["num_kv_blocks_received"] for w in after
    )
    assert received == 2, received  # 212 tokens: 14 blocks of KV, 12 reused by the decode side


def test_cache_salt_keeps_tenants_apart(cluster, reference):
    base, _ = cluster
    prompt = _prompt(5, 180)
    expected = _expected(reference, prompt)

    def prefill_hits() -> int:
        workers = _settled(base)
        return sum(w["prefix_cache_hits"] for k, w in workers.items() if k.startswith("prefill"))

    start = prefill_hits()
    assert _complete(base, prompt, cache_salt="tenant-a")["choices"][0]["text"] == expected
    assert _complete(base, prompt, cache_salt="tenant-b")["choices"][0]["text"] == expected
    assert prefill_hits() == start  # b did not see a's blocks
    assert _complete(base, prompt, cache_salt="tenant-a")["choices"][0]["text"] == expected
    assert prefill_hits() == start + 176  # a sees its own (11 blocks)


def test_eviction_and_reset_leave_no_index_entries(cluster):
    base, redis = cluster
    prompt = _prompt(6, 200)
    _complete(base, prompt)
    assert _eventually(lambda: _lookup(redis.url, prompt))
    for seed in range(10, 18):  # 8 x 19 blocks through 2 x 48-block pools: all evicted
        _complete(base, _prompt(seed, 300))
    assert _eventually(lambda: not _lookup(redis.url, prompt))
    last = _prompt(17, 300)
    assert _eventually(lambda: _lookup(redis.url, last))
    _settled(base)
    assert httpx.post(base + "/reset_prefix_cache").status_code == 200
    assert _eventually(lambda: not _lookup(redis.url, last))


def test_redis_outage_keeps_serving_and_its_return_restores_the_index(
    cluster, redis_port, reference
):
    base, redis = cluster
    redis.stop()
    prompt = _prompt(7, 150)
    for _ in range(2):
        assert _complete(base, prompt)["choices"][0]["text"] == _expected(reference, prompt)
    down = _eventually(
        lambda: not httpx.get(base + "/stats").json()["scheduler"]["index_available"]
    )
    assert down, "the scheduler did not notice Redis was gone"
    restarted = start_redis(redis_port)
    try:
        # The scheduler notices, asks every worker for its cache, and the index is whole
        # (the workers' resyncs land one after the other: wait for both).
        def whole_holders() -> dict:
            holders = _lookup(restarted.url, prompt)
            roles = {w.split("-")[0] for w, n in holders.items() if n == 9}  # 150 tokens: 9 blocks
            return holders if roles == {"decode", "prefill"} else {}

        holders = _eventually(whole_holders, timeout=15)
        assert holders, _lookup(restarted.url, prompt)
        assert _complete(base, prompt)["choices"][0]["text"] == _expected(reference, prompt)
    finally:
        redis.proc, redis.scratch = restarted.proc, restarted.scratch  # the fixture stops it
        redis._stopped = False
