"""An FP8 KV cache on both deployments. The cluster moves fp8 bytes (a quarter of fp32's)
over NATS and over shared memory, reuses cached prefixes on both sides, and preempts by
recompute; every greedy output equals the in-process engine's with the same cache."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tandem.engine.llm import LLM
from tandem.engine.request import SamplingParams
from tests.helpers.cluster import (
    assert_all_blocks_free,
    kv_transfers,
    start_cluster,
    stop_cluster,
)

MAX_TOKENS = 60


def _prompts(seed: int, n: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, 256, (length,), generator=g).tolist()  # a common prefix
    return [shared + torch.randint(3, 256, (4,), generator=g).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return LLM(tiny_llama, dtype="float32", max_model_len=256, num_gpu_blocks_override=256,
               kv_cache_dtype="fp8")  # fmt: skip


def _expected(engine: LLM, prompts) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in engine.generate(prompts, params)]


def _complete(base: str, prompts) -> list[list[int]]:
    def one(ids):
        body = {"prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}  # fmt: skip
        r = httpx.post(base + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


@pytest.mark.parametrize(
    "flags, env",
    [
        # NATS; 8 blocks: two requests outgrow them, so the decode worker preempts
        (("--num-gpu-blocks-override", "8", "--max-model-len", "128"), {"TANDEM_KV_SHM": "0"}),
        (("--num-gpu-blocks-override", "256"), {}),  # shared memory
        (("--colocated", "--num-gpu-blocks-override", "256"), {}),
    ],
    ids=["cluster-nats-preempting", "cluster-shm", "colocated"],
)
def test_fp8_outputs_equal_the_engine_and_blocks_move_as_fp8(tiny_llama, engine, flags, env):
    proc, base = start_cluster(tiny_llama, "--kv-cache-dtype", "fp8", "--max-model-len", "256",
                               "--max-local-prefill-length", "0",  # every request handed off
                               *flags, env=env)  # fmt: skip
    try:
        first, again = _prompts(1, 6, 40), _prompts(1, 6, 40)[::-1]
        assert _complete(base, first) == _expected(engine, first)
        assert _complete(base, again) == _expected(engine, again)  # prefix hits now
        workers = httpx.get(base + "/stats", timeout=10).json()["workers"]
        for w in workers.values():
            assert w["kv_cache_dtype"] in ("float8_e4m3fn", "fp8"), w
        if "--colocated" not in flags:
            assert sum(w["prefix_cache_hits"] for w in workers.values()), workers
        metrics = httpx.get(base + "/metrics", timeout=10).text
        assert 'cache_dtype="fp8"' in metrics
        if "--colocated" not in flags:
            kv = kv_transfers(base, at_least=12)
            tile = 2 * 2 * 2 * 16 * 12  # layers x (K, V) x KV heads x block x head size
            deadline = time.monotonic() + 10
            while True:  # both sides' counters, once their heartbeats are all in
                workers = httpx.get(base + "/stats", timeout=10).json()["workers"]
                received = sum(w["num_kv_blocks_received"] for w in workers.values())
                kv = httpx.get(base + "/stats", timeout=10).json()["kv_transfer"]
                if (received and kv["bytes"] == received * tile) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert received and kv["bytes"] == received * tile, (kv, received)  # 1 B a value
            if env:
                assert kv["num_shared_memory"] == 0, kv
                assert any(w["num_preemptions"] for w in workers.values()), workers
            else:
                assert kv["num_shared_memory"] == kv["num_transfers"], kv
        assert_all_blocks_free(base)
    finally:
        stop_cluster(proc)
