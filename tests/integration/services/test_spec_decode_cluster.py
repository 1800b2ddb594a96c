"""Speculative decoding in the cluster: decode workers verify a draft model's proposals
(its KV of each prompt recomputed there), a hand-off arrives at a speculating worker, several
tokens per step travel the token path (batch, stream), and greedy output is the engine's
without speculation; vLLM's spec_decode metrics reach /metrics. (The n-gram and suffix
proposers share the verification path: tests/integration/engine/test_spec_decode.py.)"""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
import torch

from tandem.engine.llm import LLM
from tandem.engine.request import SamplingParams
from tests.helpers.cluster import assert_all_blocks_free, start_cluster, stop_cluster
from tests.helpers.hf import truncated_draft


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    """With a draft model: the proposers share the verification path, and the draft's is the
    one a hand-off touches (its KV of the prompt recomputed on the decode worker)."""
    draft = truncated_draft(tiny_llama, tmp_path_factory.mktemp("draft"))
    spec = json.dumps({"model": draft, "num_speculative_tokens": 3})
    proc, base = start_cluster(tiny_llama, "--max-model-len", "256", "--speculative-config",
                               spec, "--max-local-prefill-length", "0")  # fmt: skip
    try:
        yield base
    finally:
        stop_cluster(proc)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(8)
    out = []
    for n in (6, 11, 23):
        part = torch.randint(3, 256, (n,), generator=g).tolist()
        out.append(part + part)
    return out


def test_greedy_through_the_cluster_equals_the_engine_without_speculation(cluster, tiny_llama):
    plain = LLM(tiny_llama, dtype="float32", max_model_len=256, num_gpu_blocks_override=128)
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in plain.generate(_prompts(), params)]
    for prompt, want in zip(_prompts(), expected):
        body = {"prompt": prompt, "max_tokens": 48, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}  # fmt: skip
        r = httpx.post(cluster + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == want
        streamed = []
        with httpx.stream("POST", cluster + "/v1/completions", json=body | {"stream": True},
                          timeout=60) as s:  # fmt: skip
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    streamed += json.loads(line[6:])["choices"][0].get("token_ids") or []
        assert streamed == want
    deadline = time.monotonic() + 15
    while True:  # each worker pushes its metrics now and then: wait for the decode's
        metrics = httpx.get(cluster + "/metrics", timeout=10).text
        drafts = re.findall(r'^vllm:spec_decode_num_drafts_total\{[^}]*role="decode"[^}]*\} '
                            r"(\S+)", metrics, re.M)  # fmt: skip
        accepted = re.findall(r"^vllm:spec_decode_num_accepted_tokens_total\{[^}]*\} (\S+)",
                              metrics, re.M)  # fmt: skip
        if (drafts and float(drafts[0]) > 0) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert drafts and float(drafts[0]) > 0, [line for line in metrics.split("\n") if "spec" in line]
    assert accepted and sum(map(float, accepted)) > 0
    assert_all_blocks_free(cluster)
