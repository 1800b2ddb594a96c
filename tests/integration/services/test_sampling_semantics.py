"""Request semantics as in vLLM V1, end to end: logprobs and prompt logprobs against Hugging
Face in fp32 (with and without a prefix-cache hit), seeded sampling that does not depend on
the batch or the deployment, n, echo, token ids, bans and biases, through both deployments."""

from __future__ import annotations

import concurrent.futures
import json
import math
from pathlib import Path

import httpx
import pytest
import torch

from tandem.engine.llm import LLM
from tandem.engine.request import SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, dtype="float32", num_gpu_blocks_override=128, max_model_len=256)


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab) log_softmax of Hugging Face's logits after each position."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return logits.log_softmax(dim=-1)


REPO = Path(__file__).resolve().parents[3]

PROMPT = [5, 9, 33, 71, 2, 18, 101, 7, 64, 200, 13, 44, 81, 90, 6, 12, 150, 3, 77]  # > a block


def _check_against(ref: torch.Tensor, position: int, token: int, lp: float, top: dict):
    """One position's logprob and alternatives ({token id: logprob}) against the reference."""
    row = ref[position]
    assert abs(lp - row[token].item()) < 1e-4
    best = row.topk(len(top))
    assert set(top) == set(best.indices.tolist())
    for token_id, value in top.items():
        assert abs(value - row[token_id].item()) < 1e-4


def test_engine_logprobs_and_prompt_logprobs_match_hf(llm, hf_llama):
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=3, prompt_logprobs=2)
    for _ in range(2):  # the second run's prompt is in the prefix cache
        (out,) = llm.generate([PROMPT], params)
        completion = out.outputs[0]
        ref = hf_logprobs(hf_llama, PROMPT + completion.token_ids)
        for i, (token, lp) in enumerate(zip(completion.token_ids, completion.logprobs)):
            pos = len(PROMPT) - 1 + i
            assert lp.token_id == token and lp.rank == 1  # greedy
            _check_against(ref, pos, token, lp.logprob, dict(zip(lp.top_ids, lp.top_logprobs)))
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(PROMPT)
        for p, lp in enumerate(out.prompt_logprobs[1:], 1):
            assert lp.token_id == PROMPT[p]
            assert lp.rank == int((ref[p - 1] > ref[p - 1, PROMPT[p]]).sum()) + 1
            _check_against(
                ref, p - 1, PROMPT[p], lp.logprob, dict(zip(lp.top_ids, lp.top_logprobs))
            )
        assert out.num_cached_tokens == 0  # prompt logprobs recompute the cached prefix
    # without prompt logprobs the same prompt does hit the cache
    (out,) = llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0))
    assert out.num_cached_tokens == 16


def test_api_logprobs_match_hf_on_both_deployments(server, hf_llama):
    base = server[0]
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 2,
            "prompt_logprobs": 1, "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    choice = httpx.post(base + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    tokens = choice["token_ids"]
    assert choice["prompt_token_ids"] == PROMPT and len(tokens) == 6
    ref = hf_logprobs(hf_llama, PROMPT + tokens)
    lps = choice["logprobs"]
    assert len(lps["tokens"]) == len(lps["token_logprobs"]) == len(lps["top_logprobs"]) == 6
    assert lps["text_offset"][0] == 0
    for i, token in enumerate(tokens):
        pos = len(PROMPT) - 1 + i
        assert abs(lps["token_logprobs"][i] - ref[pos, token].item()) < 1e-4
        top = lps["top_logprobs"][i]
        # (a dict by token text: byte tokens that render alike collapse, as with OpenAI's)
        assert 1 <= len(top) <= 2
        assert max(top.values()) == pytest.approx(ref[pos].max().item(), abs=1e-4)
    prompt_lps = choice["prompt_logprobs"]
    assert prompt_lps[0] is None and len(prompt_lps) == len(PROMPT)
    for p in range(1, len(PROMPT)):
        entry = prompt_lps[p][str(PROMPT[p])]
        assert abs(entry["logprob"] - ref[p - 1, PROMPT[p]].item()) < 1e-4
        assert entry["rank"] >= 1 and "decoded_token" in entry

    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}  # fmt: skip
    got = httpx.post(base + "/v1/chat/completions", json=chat, timeout=60).json()
    content = got["choices"][0]["logprobs"]["content"]
    assert 1 <= len(content) <= 3
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
        assert entry["bytes"] == list(entry["token"].encode())


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_reads_it(server, hf_llama):
    base = server[0]
    ref = hf_logprobs(hf_llama, PROMPT)
    for max_tokens in (0, 1):
        body = {"prompt": PROMPT, "max_tokens": max_tokens, "echo": True, "logprobs": 1,
                "temperature": 0}  # fmt: skip
        r = httpx.post(base + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(PROMPT) + max_tokens == len(lp["text_offset"])
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for p in range(1, len(PROMPT)):
            assert abs(lp["token_logprobs"][p] - ref[p - 1, PROMPT[p]].item()) < 1e-4
            assert lp["tokens"][p] in lp["top_logprobs"][p]  # the prompt token among them
        assert lp["text_offset"] == sorted(lp["text_offset"])
        if max_tokens == 0:
            assert (
                choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 0
            )
        else:
            assert lp["token_logprobs"][-1] is not None
    # Streamed: the first chunk leads with the prompt and its logprobs (as vLLM streams it).
    body = {"prompt": PROMPT, "max_tokens": 3, "echo": True, "logprobs": 1, "temperature": 0,
            "stream": True, "ignore_eos": True}  # fmt: skip
    whole = httpx.post(base + "/v1/completions", json=dict(body, stream=False), timeout=60)
    whole = whole.json()["choices"][0]
    chunks = []
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:])["choices"][0])
    assert "".join(c["text"] for c in chunks) == whole["text"]
    joined = {k: [v for c in chunks for v in c["logprobs"][k]] for k in whole["logprobs"]}
    first = chunks[0]["logprobs"]
    assert len(first["tokens"]) > len(PROMPT)
    assert first["text_offset"] == whole["logprobs"]["text_offset"][: len(first["tokens"])]
    for key in ("tokens", "token_logprobs", "top_logprobs"):  # offsets: of the text sent
        assert joined[key] == whole["logprobs"][key]
    no_echo = {"prompt": PROMPT, "max_tokens": 0}
    assert httpx.post(base + "/v1/completions", json=no_echo, timeout=60).status_code == 400


def test_seeded_sampling_ignores_the_batch_and_the_deployment(server, llm):
    base = server[0]
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "top_k": 50, "seed": 1234,
            "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    expected = (
        llm.generate(
            [PROMPT],
            SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=1234, ignore_eos=True),
        )[0]
        .outputs[0]
        .token_ids
    )

    def post(b):
        return httpx.post(base + "/v1/completions", json=b, timeout=60).json()

    alone = post(body)["choices"][0]["token_ids"]
    others = [dict(body, seed=None, prompt=PROMPT[: 5 + i]) for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(7) as pool:
        futures = [pool.submit(post, b) for b in [*others[:3], body, *others[3:]]]
        crowded = futures[3].result()["choices"][0]["token_ids"]
        for f in futures:
            f.result()
    assert alone == crowded == expected


def test_n_echo_bias_and_bans(server, llm):
    base = server[0]

    def post(**b):
        r = httpx.post(base + "/v1/completions", json={"prompt": PROMPT, **b}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    # n: one choice per sample, a seeded request's j-th sample uses seed + j
    got = post(n=3, max_tokens=5, temperature=1.0, seed=7, return_token_ids=True,
               ignore_eos=True)  # fmt: skip
    assert [c["index"] for c in got["choices"]] == [0, 1, 2]
    assert got["usage"]["completion_tokens"] == 15 and got["usage"]["prompt_tokens"] == 19
    for j, choice in enumerate(got["choices"]):
        want = llm.generate([PROMPT], SamplingParams(max_tokens=5, temperature=1.0, seed=7 + j,
                                                     ignore_eos=True))  # fmt: skip
        assert choice["token_ids"] == want[0].outputs[0].token_ids
    # echo: the prompt's text first
    prompt_text = httpx.post(base + "/detokenize", json={"tokens": PROMPT}).json()["prompt"]
    echoed = post(echo=True, max_tokens=3, temperature=0)["choices"][0]["text"]
    assert echoed.startswith(prompt_text) and len(echoed) > len(prompt_text)
    # a large bias forces a token; allowed_token_ids restricts every token
    forced = post(max_tokens=4, temperature=0, logit_bias={"42": 100}, return_token_ids=True)
    assert forced["choices"][0]["token_ids"] == [42] * 4
    allowed = post(max_tokens=6, temperature=1.0, seed=3, allowed_token_ids=[10, 11, 12],
                   return_token_ids=True, ignore_eos=True)  # fmt: skip
    assert set(allowed["choices"][0]["token_ids"]) <= {10, 11, 12}
    # penalties change a greedy continuation (and stay greedy-deterministic)
    plain = post(max_tokens=16, temperature=0, ignore_eos=True, return_token_ids=True)
    penalized = post(max_tokens=16, temperature=0, ignore_eos=True, return_token_ids=True,
                     frequency_penalty=2.0, repetition_penalty=1.5)  # fmt: skip
    want = llm.generate(
        [PROMPT],
        SamplingParams(
            max_tokens=16,
            temperature=0,
            ignore_eos=True,
            frequency_penalty=2.0,
            repetition_penalty=1.5,
        ),
    )
    assert penalized["choices"][0]["token_ids"] == want[0].outputs[0].token_ids
    assert penalized["choices"][0]["token_ids"] != plain["choices"][0]["token_ids"]
    # min_tokens: EOS is never sampled before it (the bias makes EOS, id 2, the favourite)
    short = post(max_tokens=8, temperature=0, logit_bias={"2": 100}, min_tokens=5,
                 return_token_ids=True)  # fmt: skip
    ids = short["choices"][0]["token_ids"]
    assert len(ids) == 6 and 2 not in ids[:5] and ids[5] == 2
    assert short["choices"][0]["finish_reason"] == "stop"
    # truncate_prompt_tokens keeps the last k prompt tokens
    cut = post(max_tokens=1, truncate_prompt_tokens=4, return_token_ids=True)
    assert cut["choices"][0]["prompt_token_ids"] == PROMPT[-4:]
    assert cut["usage"]["prompt_tokens"] == 4


def _prefill_tokens(base: str) -> float:
    """Prompt tokens computed by the engines so far (waiting for the stages' first push)."""
    import time

    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(base + "/metrics", timeout=10).text
        values = [
            s.value
            for f in text_string_to_metric_families(text)
            if f.name == "tandem:prefill_tokens"
            for s in f.samples
        ]
        if values:
            return sum(values)
        assert time.monotonic() < deadline, "no engine pushed its metrics"
        time.sleep(0.2)


def test_n_samples_share_one_prefill_on_both_deployments(server):
    import time

    base = server[0]
    prompt = [100 + i for i in range(37)]  # in no cache yet
    before = _prefill_tokens(base)
    while True:  # settled: no earlier request's count still on its way
        time.sleep(1.2)
        again = _prefill_tokens(base)
        if again == before:
            break
        before = again
    body = {"prompt": prompt, "n": 3, "max_tokens": 4, "temperature": 1.0, "seed": 5,
            "ignore_eos": True}  # fmt: skip
    got = httpx.post(base + "/v1/completions", json=body, timeout=60).json()
    assert len(got["choices"]) == 3 and got["usage"]["completion_tokens"] == 12
    deadline = time.monotonic() + 10
    while _prefill_tokens(base) - before < len(prompt):  # the stages push once a second
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1.5)  # and nothing more arrives
    assert _prefill_tokens(base) - before == len(prompt)


def test_logprob_values_are_finite_and_sorted(server):
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0.8, "seed": 1, "logprobs": 5}
    got = httpx.post(server[0] + "/v1/completions", json=body, timeout=60).json()
    for top in got["choices"][0]["logprobs"]["top_logprobs"]:
        values = list(top.values())
        assert values == sorted(values, reverse=True) and all(math.isfinite(v) for v in values)


def _repeated_ngram(prompt: list[int], output: list[int], n: int = 3) -> bool:
    """Whether an n-gram that ends in the output occurred earlier in prompt + output."""
    tokens = prompt + output
    seen = {tuple(tokens[i : i + n]) for i in range(len(prompt) - n + 1)}
    for i in range(max(len(prompt) - n + 1, 0), len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        if gram in seen:
            return True
        seen.add(gram)
    return False


def test_global_logits_processor_applies_to_every_request(tiny_llama, llm):
    prompts = [PROMPT, PROMPT[:7], [4, 4, 4, 9]]
    # the bias makes every request repeat token 7 forever, unless something stops it
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logit_bias={7: 30.0})
    plain = llm.generate(prompts, params)
    assert all(_repeated_ngram(p, o.outputs[0].token_ids) for p, o in zip(prompts, plain))
    name = "tandem.engine.logits_processors:NoRepeatNGramLogitsProcessor"
    with_processor = LLM(tiny_llama, dtype="float32", num_gpu_blocks_override=128,
                         logits_processors=[name])  # fmt: skip
    for p, out in zip(prompts, with_processor.generate(prompts, params)):
        assert len(out.outputs[0].token_ids) == 30
        assert not _repeated_ngram(p, out.outputs[0].token_ids)
    with pytest.raises(ValueError, match="logits_processors"):
        LLM(tiny_llama, dtype="float32", logits_processors=["no.such.module:Nope"])


def test_n_samples_fork_after_one_prefill(tiny_llama):
    for prompt in (PROMPT, PROMPT[:16]):  # a partial last block (copied per fork), or none
        llm = LLM(tiny_llama, dtype="float32", num_gpu_blocks_override=64)
        params = SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=11, ignore_eos=True)
        (out,) = llm.generate([prompt], params)
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert llm.engine.num_prefill_tokens == len(prompt)  # the prompt was computed once
        fresh = LLM(tiny_llama, dtype="float32", num_gpu_blocks_override=64)
        for j, completion in enumerate(out.outputs):  # each as its own seeded request
            one = SamplingParams(max_tokens=10, temperature=1.0, seed=11 + j, ignore_eos=True)
            assert completion.token_ids == fresh.generate([prompt], one)[0].outputs[0].token_ids
        assert llm.engine.kv.num_free_blocks == 64
        llm.engine.kv.check_integrity()
    # greedy samples are all the same; with max_tokens=1 forks end at once
    (out,) = llm.generate([PROMPT], SamplingParams(n=4, max_tokens=1, temperature=0))
    assert len({tuple(c.token_ids) for c in out.outputs}) == 1
    assert all(c.finish_reason == "length" for c in out.outputs)
    assert llm.engine.kv.num_free_blocks == 64


def test_priority_orders_a_full_queue(tiny_llama):
    """One sequence at a time: while a long request runs, requests queue up; they then start
    by priority (lower first), not by arrival."""
    import time

    from tests.helpers.cluster import start_cluster, stop_cluster

    proc, base = start_cluster(
        tiny_llama, "--colocated", "--scheduling-policy", "priority", "--max-num-seqs", "1"
    )
    try:
        first_token: dict[int, float] = {}
        finished: dict[int, float] = {}

        def run(priority: int, max_tokens: int) -> None:
            body = {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True,
                    "priority": priority, "stream": True}  # fmt: skip
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        first_token.setdefault(priority, time.monotonic())
            finished[priority] = time.monotonic()

        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            blocker = pool.submit(run, 10, 480)
            while 10 not in first_token:
                time.sleep(0.01)
            queued = []
            for p in (3, 1, 2, 0):
                queued.append(pool.submit(run, p, 16))
                time.sleep(0.02)
            all_queued = time.monotonic()
            for f in [blocker, *queued]:
                f.result()
        assert finished[10] > all_queued, "the long request ended before the queue filled"
        assert sorted(first_token, key=first_token.get) == [10, 0, 1, 2, 3]
    finally:
        stop_cluster(proc)


def test_stop_token_ids_and_stop_strings_as_in_vllm(server):
    base = server[0]

    def post(**b):
        r = httpx.post(base + "/v1/completions", json={"prompt": PROMPT, **b}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    forced = post(max_tokens=8, temperature=0, logit_bias={"42": 100}, stop_token_ids=[42],
                  return_token_ids=True)  # fmt: skip
    assert forced["finish_reason"] == "stop" and forced["stop_reason"] == 42
    assert forced["token_ids"] == [42]
    # the same stop token after min_tokens: it may only end the request from then on
    late = post(max_tokens=8, temperature=0, logit_bias={"42": 100}, stop_token_ids=[42],
                min_tokens=3, return_token_ids=True)  # fmt: skip
    assert late["token_ids"][3] == 42 and len(late["token_ids"]) == 4
    assert 42 not in late["token_ids"][:3]
    # stop strings: cut before the string, or kept with include_stop_str_in_output
    text = post(max_tokens=12, temperature=0, ignore_eos=True)["text"]
    stop = text[3:6]
    assert stop and stop in text
    cut = post(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop])
    kept = post(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop],
                include_stop_str_in_output=True)  # fmt: skip
    assert cut["text"] == text[: text.index(stop)] and cut["stop_reason"] == stop
    assert kept["text"] == text[: text.index(stop) + len(stop)]
    assert cut["finish_reason"] == kept["finish_reason"] == "stop"


def test_lm_eval_scores_and_generates_as_hugging_face(server, tiny_llama, hf_llama, monkeypatch):
    """lm-eval itself against the gateway: `local-completions` (loglikelihood and
    generate_until) and `local-chat-completions`, on the task in tests/data/lm_eval, with the
    local tokenizer and nothing downloaded. Loglikelihoods equal Hugging Face's in fp32."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(REPO)  # the task's data_files path is relative to the repository
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    base = server[0]
    tasks = TaskManager(include_path=str(REPO / "tests/data/lm_eval"))
    common = f"model=tiny-llama,tokenizer={tiny_llama},num_concurrent=2,max_retries=1"
    out = simple_evaluate(
        model="local-completions",
        model_args=f"{common},base_url={base}/v1/completions,tokenizer_backend=huggingface",
        tasks=["tandem_tiny_choice", "tandem_tiny_gen"],
        task_manager=tasks,
        log_samples=True,
    )
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    scored = 0
    for sample in out["samples"]["tandem_tiny_choice"]:
        for (context, continuation), (ll, greedy) in zip(
            (r for r in sample["arguments"]), (r[0] for r in sample["resps"])
        ):
            ctx = tok.encode(context, add_special_tokens=False)
            cont = tok.encode(context + continuation, add_special_tokens=False)[len(ctx) :]
            ref = hf_logprobs(hf_llama, ctx + cont)
            rows = ref[len(ctx) - 1 : -1]
            expected = rows.gather(1, torch.tensor(cont)[:, None]).sum().item()
            assert abs(ll - expected) < 1e-3, (context, continuation, ll, expected)
            assert greedy == bool((rows.argmax(-1) == torch.tensor(cont)).all())
            scored += 1
    assert scored == 10  # 3 + 2 + 3 + 2 choices
    assert len(out["samples"]["tandem_tiny_gen"]) == 4
    for sample in out["samples"]["tandem_tiny_gen"]:
        ids = tok.encode(sample["arguments"][0][0], add_special_tokens=False)
        expected = _hf_greedy_text(hf_llama, tok, ids, 6).split("\n")[0]
        assert sample["resps"][0][0] == expected

    chat = simple_evaluate(
        model="local-chat-completions",
        model_args=f"{common},base_url={base}/v1/chat/completions",
        tasks=["tandem_tiny_gen"],
        task_manager=tasks,
        apply_chat_template=True,
        log_samples=True,
    )
    assert len(chat["samples"]["tandem_tiny_gen"]) == 4
    for sample in chat["samples"]["tandem_tiny_gen"]:
        messages = [{"role": "user", "content": sample["doc"]["context"]}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
        expected = _hf_greedy_text(hf_llama, tok, ids, 6).split("\n")[0]
        assert sample["resps"][0][0] == expected


def _hf_greedy_text(model, tok, ids: list[int], max_new: int) -> str:
    """Hugging Face's greedy continuation of `ids`, stopped at EOS, as text."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, pad_token_id=0
        )[0, len(ids) :].tolist()
    if tok.eos_token_id in out:
        out = out[: out.index(tok.eos_token_id)]
    return tok.decode(out, skip_special_tokens=True)
