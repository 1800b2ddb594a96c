"""Conditional disaggregation for real: `tandem serve --max-local-prefill-length 16` on the
tiny model. Prompts of at most 16 tokens are prefilled by the decode worker itself (while the
prefill worker has no work), longer ones by the prefill worker and handed off; both equal
Hugging Face's greedy tokens, forks and aborts included, and every block ends free; a decode
worker killed while it holds its own prefills loses no request and no token."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tandem.bench.elastic import cluster_workers
from tests.helpers.cluster import assert_all_blocks_free, kv_transfers, start_cluster, stop_cluster
from tests.helpers.faults import reference, stats, wait_for
from tests.helpers.hf import hf_greedy

MAX_LOCAL = 16


@pytest.fixture(scope="module")
def cluster_and_log(tiny_llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("local") / "serve.log"
    proc, base = start_cluster(
        tiny_llama, "--max-local-prefill-length", str(MAX_LOCAL), "--max-model-len", "256",
        "--num-gpu-blocks-override", "128", "--served-model-name", "tiny",
        "--decode-workers", "2", "--worker-placement", "shared", log_path=log,
    )  # fmt: skip
    yield base, log
    stop_cluster(proc)


@pytest.fixture(scope="module")
def cluster(cluster_and_log):
    return cluster_and_log[0]


def local_prefills(base: str, at_least: float = 0.0, timeout: float = 10.0) -> float:
    """The scheduler's count (pushed to the gateway every second or so), once >= at_least."""
    deadline = time.monotonic() + timeout
    while True:
        count = 0.0
        for line in httpx.get(base + "/metrics").text.splitlines():
            if line.startswith("tandem:scheduler_local_prefills_total"):
                count = float(line.rsplit(" ", 1)[1])
        if count >= at_least or time.monotonic() > deadline:
            return count
        time.sleep(0.2)


def settled_local_prefills(base: str) -> float:
    """The count once the scheduler's pushes bring nothing new (two reads 1.5 s apart)."""
    count = local_prefills(base)
    while True:
        time.sleep(1.5)
        again = local_prefills(base)
        if again == count:
            return count
        count = again


def complete(base: str, prompt: list[int], max_tokens: int, **extra) -> dict:
    body = dict(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, **extra)
    r = httpx.post(base + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_short_prompts_stay_on_the_decode_worker_long_ones_are_handed_off_all_equal_hf(
    cluster, hf_llama
):
    g = torch.Generator().manual_seed(3)
    lengths = [3, MAX_LOCAL, MAX_LOCAL + 1, 40, 9, 100]
    prompts = [torch.randint(5, 250, (n,), generator=g).tolist() for n in lengths]
    before = settled_local_prefills(cluster)
    handed_off = kv_transfers(cluster, 0)["num_transfers"]

    def run(i: int) -> list[int]:
        out = complete(cluster, prompts[i], 12, return_token_ids=True)
        return out["choices"][0]["token_ids"]

    # the short ones first: while a prefill worker has work, every prompt goes there
    short = [i for i, n in enumerate(lengths) if n <= MAX_LOCAL]
    long = [i for i, n in enumerate(lengths) if n > MAX_LOCAL]
    got = {}
    for group in short, long:
        with ThreadPoolExecutor(len(group)) as pool:
            got.update(zip(group, pool.map(run, group)))
    assert [got[i] for i in range(len(prompts))] == [hf_greedy(hf_llama, p, 12) for p in prompts]
    num_local = len(short)
    assert local_prefills(cluster, before + num_local) - before == num_local
    kv = kv_transfers(cluster, at_least=handed_off + len(lengths) - num_local)
    assert kv["num_transfers"] - handed_off == len(lengths) - num_local, kv
    assert_all_blocks_free(cluster)


def test_forks_of_a_local_prefill_equal_hf(cluster, hf_llama):
    prompt = [7, 99, 212, 3, 64]
    out = complete(cluster, prompt, 10, n=2, return_token_ids=True)
    want = hf_greedy(hf_llama, prompt, 10)
    assert [c["token_ids"] for c in out["choices"]] == [want, want]
    assert_all_blocks_free(cluster)


def test_a_local_prefill_aborted_mid_stream_frees_its_blocks_and_the_next_is_served(
    cluster, hf_llama
):
    body = dict(model="tiny", prompt=[11, 12, 13], max_tokens=200, temperature=0,
                ignore_eos=True, stream=True)  # fmt: skip
    with httpx.stream("POST", cluster + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # the first token came: the client goes away
    assert_all_blocks_free(cluster, timeout=20)
    prompt = [21, 22, 23, 24]
    got = complete(cluster, prompt, 8, return_token_ids=True)["choices"][0]["token_ids"]
    assert got == hf_greedy(hf_llama, prompt, 8)


def test_decode_workers_killed_while_they_hold_their_own_prefills_lose_nothing(cluster_and_log):
    """Every decode worker is killed once each stream has its first token: the tokenizer
    re-queues the requests they held (with the tokens streamed), the restarted workers
    prefill them again, and each stream goes on with exactly the tokens it would have had."""
    cluster, log = cluster_and_log
    prompts = [f"kill {i} says" for i in range(4)]  # <= 16 tokens (bytes): prefilled locally
    before = settled_local_prefills(cluster)
    expected = reference(cluster, prompts)
    assert local_prefills(cluster, before + len(prompts)) - before == len(prompts)
    decode_ids = [k for k in cluster_workers(cluster) if k.startswith("decode")]

    async def stream(http: httpx.AsyncClient, prompt: str, started: asyncio.Event) -> list[int]:
        body = dict(prompt=prompt, max_tokens=len(expected[0]), ignore_eos=True, temperature=0,
                    return_token_ids=True, stream=True)  # fmt: skip
        tokens: list[int] = []
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    tokens += json.loads(line[6:])["choices"][0].get("token_ids") or []
                    started.set()
        return tokens

    async def scenario() -> list[list[int]]:
        async with httpx.AsyncClient(base_url=cluster, timeout=180) as http:
            started = [asyncio.Event() for _ in prompts]
            tasks = [asyncio.create_task(stream(http, p, e)) for p, e in zip(prompts, started)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
            for worker_id in decode_ids:
                os.kill(cluster_workers(cluster)[worker_id].pid, signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*tasks), 180)

    assert asyncio.run(scenario()) == expected  # nothing repeated or lost
    text = log.read_text()
    assert any(f"{worker_id} lost: " in text for worker_id in decode_ids)
    for worker_id in decode_ids:
        wait_for(lambda w=worker_id: f"{w}.1" in stats(cluster), 120, "not restarted")
    assert_all_blocks_free(cluster, timeout=30)
