"""Speculative decoding (n-gram proposals verified in one forward pass) changes no greedy
token: against Hugging Face on tiny random models of each family (with chunked prefill,
preemption and prefix hits) and against the engine without it on the default model; seeded
sampling repeats itself; logprobs of accepted tokens are the plain run's; structured outputs
are the plain run's; every block is
free at the end and the pool stays consistent."""

from __future__ import annotations

import json

import pytest
import torch

from tandem.engine.llm import LLM
from tandem.engine.request import SamplingParams
from tandem.engine.structured_output import backends
from tandem.engine.structured_output.params import StructuredOutputsConfig
from tandem.engine.structured_output.params import StructuredOutputsParams as SO
from tests.helpers.hf import hf_greedy, truncated_draft

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
        "prompt_lookup_max": 3}  # fmt: skip
SUFFIX = {"method": "suffix", "num_speculative_tokens": 6, "suffix_decoding_max_tree_depth": 8}


@pytest.fixture(params=["ngram", "suffix", "draft"])
def method(request, tiny_model, tmp_path_factory) -> dict:
    if request.param == "draft":
        out = tmp_path_factory.mktemp("draft")
        return {"model": truncated_draft(tiny_model, out), "num_speculative_tokens": 3}
    return SPEC if request.param == "ngram" else SUFFIX


@pytest.fixture(scope="module")
def hf_tiny(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def repetitive_prompts() -> list[list[int]]:
    """Prompts with repeats in them (so that proposals are found from the start)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for n in (5, 9, 17, 30):
        part = torch.randint(3, 256, (n,), generator=g).tolist()
        out.append(part + part[: n // 2] + part)
    return out


def _assert_clean(llm: LLM) -> None:
    llm.engine.kv.check_integrity()
    assert llm.engine.kv.num_free_blocks == llm.engine.runner.info.num_blocks
    draft = getattr(llm.engine.spec, "proposer", None)
    if hasattr(draft, "free_blocks"):  # the draft model's own cache is free too
        assert sorted(draft.free_blocks) == list(range(llm.engine.runner.info.num_blocks))
        assert not draft.states


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        dict(),
        dict(max_num_batched_tokens=8, block_size=4),  # chunked prefill, budgets of 8
        dict(num_gpu_blocks_override=32, block_size=4, max_model_len=128),  # preempts
    ],
    ids=["default", "chunked-8", "preemption"],
)
def test_greedy_with_proposals_equals_hf(tiny_model, hf_tiny, engine_kwargs, method):
    kwargs = dict(dtype="float32", num_gpu_blocks_override=256) | engine_kwargs
    llm = LLM(tiny_model, speculative_config=method, **kwargs)
    prompts = repetitive_prompts()
    params = SamplingParams(max_tokens=40, temperature=0.0)
    for _ in range(2):  # the second time from the prefix cache
        outs = llm.generate(prompts, params)
        for prompt, out in zip(prompts, outs):
            assert out.outputs[0].token_ids == hf_greedy(hf_tiny, prompt, 40)
    spec = llm.engine.spec
    assert spec.num_drafts > 0, vars(spec)  # proposals verified (and mostly rejected)
    if "llama" in tiny_model or "model" in method:  # its greedy text repeats itself, or
        assert spec.num_accepted_tokens > 0, vars(spec)  # the draft is much of the model
    assert llm.engine.num_steps < 2 * 40 * len(prompts)  # some steps made several tokens
    _assert_clean(llm)


RECORD = {"name": "Alice Smith", "age": 30, "city": "Paris", "tags": ["red", "green"]}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"},
          "age": {"type": "integer"}, "city": {"type": "string"},
          "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "city", "tags"]}  # fmt: skip


def test_the_default_model_with_proposals_equals_it_without(default_model):
    """N-gram and a draft against no speculation (suffix: on the tiny models): plain
    requests with logprobs, and (n-gram) structured outputs of both backends, each verified
    position masked by the grammar's state there. The draft is the model itself: every
    proposal is accepted, bonus tokens and all."""
    text = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n"
    prompts = ["Repeat this code exactly:\n" + text + "\nAgain:\n", "1, 2, 3, 4, 5, 6,",
               "The capital of France is"]  # fmt: skip
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True, logprobs=2)
    json_prompt = f"Repeat this JSON exactly: {json.dumps(RECORD)}\nJSON: "
    shaped = [
        SamplingParams(max_tokens=48, temperature=0, structured_outputs=backends.check(
            SO(json=json.dumps(SCHEMA), backend=backend), StructuredOutputsConfig()))
        for backend in ("xgrammar", "guidance")
    ]  # fmt: skip
    methods = {
        "none": None,
        "ngram": SPEC | {"num_speculative_tokens": 4, "prompt_lookup_min": 2,
                         "prompt_lookup_max": 4},
        "draft": {"model": default_model, "num_speculative_tokens": 3},
    }  # fmt: skip
    runs = {}
    for name, spec in methods.items():
        llm = LLM(default_model, dtype="float32", max_model_len=512, num_gpu_blocks_override=128,
                  speculative_config=spec)  # fmt: skip
        outs, steps = llm.generate(prompts, params), llm.engine.num_steps
        structured = None
        if name in ("none", "ngram"):
            drafts = llm.engine.spec.num_drafts if spec else 0
            structured = llm.generate([json_prompt] * 2, shaped)
            if spec:  # the structured requests speculated too
                assert llm.engine.spec.num_accepted_tokens > 0
                assert llm.engine.spec.num_drafts > drafts
        if name == "draft":
            s = llm.engine.spec
            assert s.num_accepted_tokens == s.num_draft_tokens > 0, vars(s)
        runs[name] = (outs, steps, structured)
        _assert_clean(llm)
    plain, plain_steps, plain_json = runs.pop("none")
    for name, (outs, steps, _) in runs.items():
        for a, b in zip(plain, outs):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids, name
            for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert x.top_ids == y.top_ids and abs(x.logprob - y.logprob) < 1e-3, name
        assert steps < plain_steps, name  # proposals were accepted
    for a, b in zip(plain_json, runs["ngram"][2]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert json.loads(b.outputs[0].text).keys() == RECORD.keys()


def test_seeded_sampling_with_proposals_repeats_itself(tiny_llama):
    params = SamplingParams(n=2, max_tokens=30, temperature=0.8, top_p=0.9, seed=11,
                            ignore_eos=True, presence_penalty=0.3)  # fmt: skip
    outs = []
    for _ in range(2):
        llm = LLM(tiny_llama, dtype="float32", num_gpu_blocks_override=128,
                  speculative_config=SPEC)  # fmt: skip
        outs.append([[s.token_ids for s in o.outputs]
                     for o in llm.generate(repetitive_prompts(), params)])  # fmt: skip
        assert llm.engine.spec.num_drafts > 0
        _assert_clean(llm)
    assert outs[0] == outs[1]


def test_n_samples_and_stop_strings_inside_accepted_proposals(tiny_llama):
    """n > 1 forks speculate on their own; a stop string or max_tokens that falls inside a
    step's accepted proposals ends the output exactly where the plain run's ends."""
    prompts = repetitive_prompts()
    plain = LLM(tiny_llama, dtype="float32", num_gpu_blocks_override=128)
    spec = LLM(tiny_llama, dtype="float32", num_gpu_blocks_override=128,
               speculative_config=SPEC)  # fmt: skip
    free = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    texts = [o.outputs[0].text for o in plain.generate(prompts, free)]
    stops = [t[len(t) // 2 : len(t) // 2 + 3] for t in texts]  # from the middle
    for n, stop, max_tokens in ((3, None, 40), (1, "stop", 40), (1, None, 17)):
        params = [SamplingParams(n=n, max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                 stop=[s] if stop and s.strip() else [])
                  for s in stops]  # fmt: skip
        want, got = plain.generate(prompts, params), spec.generate(prompts, params)
        if stop:  # the stop strings were met (not every output runs to its end)
            assert sum(o.outputs[0].finish_reason == "stop" for o in got) >= 2
        for a, b in zip(want, got):
            assert len(b.outputs) == n
            for x, y in zip(a.outputs, b.outputs):
                assert (x.text, x.token_ids, x.finish_reason) == (y.text, y.token_ids,
                                                                  y.finish_reason)  # fmt: skip
    assert spec.engine.spec.num_accepted_tokens > 0
    _assert_clean(spec)
