"""LoRA adapters through both deployments (the cluster with two prefill and two decode
workers): adapters are models in /v1/models (after the base, their parent); requests for
three adapters and the base model, interleaved and concurrent, each equal the engine's own
output; the same prompt under two adapters shares no cache entry; adapters loaded and
unloaded at run time; three adapters over --max-cpu-loras 2 (evicted, read again) stay
exact; an unknown adapter is a 404, a bad one a 400."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tandem.engine.llm import LLM
from tandem.engine.lora import LoRARequest
from tandem.engine.request import SamplingParams
from tests.helpers.cluster import assert_all_blocks_free, start_cluster, stop_cluster
from tests.helpers.hf import make_adapter

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cluster-adapters")
    return {name: make_adapter(tiny_llama, root / name, 8, seed)
            for seed, name in enumerate(("sql", "poem", "chat"))}  # fmt: skip


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(17)
    return [torch.randint(3, 200, (n,), generator=g).tolist() for n in (9, 21, 40)]


@pytest.fixture(scope="module")
def expected(tiny_llama, adapters) -> dict:
    llm = LLM(tiny_llama, dtype="float32", max_model_len=256, num_gpu_blocks_override=128,
              enable_lora=True, max_loras=3)  # fmt: skip
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    out = {}
    for name in (None, "sql", "poem", "chat"):
        lora = None if name is None else LoRARequest(name, 1, adapters[name])
        out[name] = [o.outputs[0].token_ids for o in llm.generate(prompts(), params,
                                                                  lora_request=lora)]  # fmt: skip
    return out


@pytest.fixture(scope="module", params=["colocated", "cluster"])
def server(request, tiny_llama, adapters):
    deployment = (["--colocated"] if request.param == "colocated" else
                  ["--prefill-workers", "2", "--decode-workers", "2",
                   "--worker-placement", "shared"])  # fmt: skip
    proc, base = start_cluster(
        tiny_llama, "--max-model-len", "256", "--num-gpu-blocks-override", "128",
        "--enable-lora", "--lora-modules", f"sql={adapters['sql']}",
        f"poem={adapters['poem']}", "--max-loras", "2", "--max-cpu-loras", "2",
        "--allow-runtime-lora-updating", "--enable-prompt-tokens-details", *deployment,
    )  # fmt: skip
    try:
        yield base
    finally:
        stop_cluster(proc)


def complete(base: str, model: str | None, prompt: list[int]) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "return_token_ids": True}  # fmt: skip
    if model is not None:
        body["model"] = model
    return httpx.post(base + "/v1/completions", json=body, timeout=60)


def test_adapters_are_models_after_the_base_their_parent(server, tiny_llama, adapters):
    cards = httpx.get(server + "/v1/models").json()["data"]
    base = cards[0]["id"]
    assert [c["id"] for c in cards] == [base, "sql", "poem"]
    assert all(c["parent"] == base and c["root"] == adapters[c["id"]] for c in cards[1:])
    r = complete(server, "nope", [5, 6, 7])
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_interleaved_requests_for_adapters_and_base_and_runtime_loading(server, adapters, expected):
    r = httpx.post(server + "/v1/load_lora_adapter",
                   json={"lora_name": "chat", "lora_path": adapters["chat"]})  # fmt: skip
    assert r.status_code == 200, r.text
    again = httpx.post(server + "/v1/load_lora_adapter",
                       json={"lora_name": "chat", "lora_path": adapters["chat"]})  # fmt: skip
    assert again.status_code == 400 and "already been loaded" in again.text
    jobs = [(name, i) for i in range(3) for name in (None, "sql", "poem", "chat")] * 2
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda job: complete(server, job[0], prompts()[job[1]]), jobs))
    for (name, i), reply in zip(jobs, replies):
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["model"] == (name or body["model"])
        assert body["choices"][0]["token_ids"] == expected[name][i], (name, i)
    assert_all_blocks_free(server)
    gone = httpx.post(server + "/v1/unload_lora_adapter", json={"lora_name": "chat"})
    assert gone.status_code == 200, gone.text
    assert complete(server, "chat", prompts()[0]).status_code == 404
    assert httpx.post(server + "/v1/unload_lora_adapter",
                      json={"lora_name": "chat"}).status_code == 404  # fmt: skip
    bad = httpx.post(server + "/v1/load_lora_adapter",
                     json={"lora_name": "x", "lora_path": "/no/such/folder"})  # fmt: skip
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora_path"


def test_one_prompt_under_two_adapters_shares_no_cache_entry(server):
    prompt = list(range(10, 74))  # four full blocks of 16

    def cached(model):
        reply = complete(server, model, prompt)
        assert reply.status_code == 200, reply.text
        return reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached("sql") == 0
    assert cached("sql") > 0  # its own entries
    assert cached("poem") == 0  # the same tokens, another adapter
    assert cached(None) == 0  # and the base model
