"""Structured outputs in the engine: a spec's checks and backend choice, the bitmask, the
scheduler holding back a request's sampling position while its grammar compiles, and the
engine keeping each request on its grammar through forks, replays and mixed batches."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tandem.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from tandem.engine.core import EngineCore
from tandem.engine.kv_cache_manager import KVCacheManager
from tandem.engine.request import Request, SamplingParams
from tandem.engine.scheduler import Scheduler
from tandem.engine.structured_output import backends, manager
from tandem.engine.structured_output.manager import ReasoningGate
from tandem.engine.structured_output.params import (
    StructuredOutputsConfig,
    StructuredOutputsParams,
)
from tandem.services.transport import codec

AUTO = StructuredOutputsConfig()
SO = StructuredOutputsParams


# -- params and checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"json": "{}", "regex": "a"}, {"choice": ()}, {"choice": ("a", "")}, {"regex": " "}],
)
def test_a_spec_is_exactly_one_non_empty_constraint(kwargs):
    with pytest.raises(ValueError, match="structured_outputs"):
        SO(**kwargs)


def test_config_takes_vllms_json_and_refuses_unknown_keys():
    config = StructuredOutputsConfig.parse(
        '{"backend": "guidance", "disable_any_whitespace": false}'
    )
    assert config == StructuredOutputsConfig("guidance", False, False)
    assert StructuredOutputsConfig.parse("xgrammar").backend == "xgrammar"
    assert StructuredOutputsConfig.parse(config.to_json()) == config
    for bad in ('{"backend": "outlines"}', '{"bakend": "auto"}', "[1]", "{"):
        with pytest.raises(ValueError, match="--structured-outputs-config"):
            StructuredOutputsConfig.parse(bad)


def test_auto_picks_xgrammar_and_guidance_for_what_xgrammar_does_not_enforce():
    plain = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert backends.check(SO(json=json.dumps(plain)), AUTO).backend == "xgrammar"
    stepped = {"type": "integer", "multipleOf": 7}
    checked = backends.check(SO(json=json.dumps(stepped)), AUTO)
    assert checked.backend == "guidance" and checked.any_whitespace is False
    strict = StructuredOutputsConfig(backend="xgrammar")
    with pytest.raises(backends.SpecError, match="does not enforce .*multipleOf"):
        backends.check(SO(json=json.dumps(stepped)), strict)
    no_fallback = StructuredOutputsConfig(disable_fallback=True)
    with pytest.raises(backends.SpecError, match="multipleOf"):
        backends.check(SO(json=json.dumps(stepped)), no_fallback)
    unique = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    with pytest.raises(backends.SpecError, match="guidance cannot serve it either"):
        backends.check(SO(json=json.dumps(unique)), AUTO)
    guidance = StructuredOutputsConfig(backend="guidance")
    assert backends.check(SO(regex="[a-z]+"), guidance).backend == "guidance"
    loose = StructuredOutputsConfig(disable_any_whitespace=False)
    assert backends.check(SO(json_object=True), loose).any_whitespace is True


def test_xgrammar_unenforced_keywords_are_found_anywhere_in_a_schema():
    schema = {
        "$defs": {"n": {"type": "number", "multipleOf": 0.5}},
        "type": "object",
        "properties": {
            "tags": {"type": "array", "uniqueItems": True},
            "when": {"type": "string", "format": "iso-week"},
            "code": {"type": "string", "pattern": "[a-z]+", "maxLength": 4},
            "ok": {"type": "string", "format": "date"},
        },
    }
    found = backends.xgrammar_unenforced(schema)
    assert "multipleOf" in found and "uniqueItems" in found
    assert "format 'iso-week'" in found
    assert "minLength/maxLength with a pattern or format" in found
    assert not any("date" in f for f in found)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (SO(json='{"type": "foo"}'), "valid JSON schema"),
        (SO(json="{not json"), "must be a JSON schema"),
        (SO(json="[1, 2]"), "must be a JSON schema"),
        (SO(regex="("), "regex is invalid"),
        (SO(grammar="root ::= (("), "grammar is invalid"),
        (SO(structural_tag="[]"), "structural tag"),
    ],
)
def test_invalid_specs_are_refused_naming_the_parameter(spec, message):
    with pytest.raises(backends.SpecError, match=message) as e:
        backends.check(spec, AUTO, "response_format")
    assert str(e.value).startswith("response_format")


def test_grammars_are_ebnf_or_lark_and_choices_become_ebnf():
    assert backends.is_lark('start: "a" | "b"') and not backends.is_lark('root ::= "a"')
    assert backends.check(SO(grammar='start: "yes" | "no"'), AUTO).backend == "xgrammar"
    assert backends.choice_ebnf(["a", 'b"c']) == 'root ::= "a" | "b\\"c"'


def test_the_spec_travels_on_the_wire_unchanged():
    for spec in (
        SO(json='{"type": "object"}', backend="xgrammar"),
        SO(choice=("a", "b, c"), backend="guidance", any_whitespace=True),
        SO(json_object=True, backend="xgrammar"),
        SO(regex="[0-9]+", backend="xgrammar"),
        SO(regex="[0-9]+", backend="xgrammar", reasoning_parser="qwen3"),
    ):
        params = SamplingParams(structured_outputs=spec)
        back = codec.sampling_params_from_proto(codec.sampling_params_to_proto(params))
        assert back.structured_outputs == spec
    assert (
        codec.sampling_params_from_proto(
            codec.sampling_params_to_proto(SamplingParams())
        ).structured_outputs
        is None
    )


# -- the bitmask ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_apply_bitmask_bans_exactly_the_cleared_bits(path, monkeypatch):
    if path == "torch":
        monkeypatch.setattr(manager, "has_cpu_bitmask_kernel", lambda: False)
    else:
        assert manager.has_cpu_bitmask_kernel()  # built wherever the tests run
    vocab, rows = 70, torch.tensor([2, 0])  # not a multiple of 32: the last word is partial
    g = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (2, 3), generator=g, dtype=torch.int32)
    logits = torch.randn(3, vocab, generator=g)
    expected = logits.clone()
    for j, row in enumerate(rows.tolist()):
        for token in range(vocab):
            if not (int(bitmask[j, token // 32]) >> (token % 32)) & 1:
                expected[row, token] = float("-inf")
    manager.apply_bitmask(logits, rows, bitmask)
    assert torch.equal(logits, expected)


# -- the scheduler -------------------------------------------------------------------------------


class Compiling:
    """A grammar that compiles until told otherwise."""

    def __init__(self) -> None:
        self.done = False
        self.matcher = None
        self.terminated = False

    def is_ready(self) -> bool:
        return self.done


def scheduler(budget=64):
    return Scheduler(SchedulerConfig(8, budget), KVCacheManager(64, 4), 256)


def test_a_request_computes_all_but_its_sampling_position_while_its_grammar_compiles():
    s = scheduler()
    waiting = Request("g", list(range(10, 20)), SamplingParams())
    waiting.grammar = Compiling()
    plain = Request("p", list(range(30, 35)), SamplingParams())
    s.add_request(waiting)
    s.add_request(plain)
    out = s.schedule()
    assert out.num_scheduled_tokens == {"g": 9, "p": 5}  # the rest of the batch goes on
    s.update_from_output(out, [None, 7])
    out = s.schedule()
    assert out.num_scheduled_tokens == {"p": 1}  # g waits, holding its blocks
    s.update_from_output(out, [7])
    waiting.grammar.done = True
    assert s.schedule().num_scheduled_tokens == {"g": 1, "p": 1}


def test_a_planned_request_stops_short_and_is_listed_deferred():
    s = scheduler()
    r = Request("g", list(range(10, 20)), SamplingParams())
    r.grammar = Compiling()
    s.add_request(r)
    out = s.schedule_plan({"g": 10})
    assert out.num_scheduled_tokens == {"g": 9} and out.deferred_ids == ["g"]
    assert not out.failed_ids
    s.update_from_output(out, [None])
    out = s.schedule_plan({"g": 1 << 30})  # the worker's own step, grammar still compiling
    assert out.num_scheduled_tokens == {} and out.deferred_ids == ["g"] and not out.failed_ids
    r.grammar.done = True
    out = s.schedule_plan({"g": 1 << 30})
    assert out.num_scheduled_tokens == {"g": 1} and not out.deferred_ids


# -- the engine ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_llama):
    model = ModelConfig(tiny_llama, dtype="float32", max_model_len=128)
    return EngineCore(EngineConfig(model, CacheConfig(num_gpu_blocks_override=64)))


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from tandem.engine.tokenizer import load_tokenizer

    return load_tokenizer(tiny_llama)


def run(engine: EngineCore, requests: list[Request]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for r in requests:
        engine.add_request(r)
    while engine.has_unfinished:
        for step in engine.step():
            assert step.error is None, step.error
            out.setdefault(step.request.request_id, []).extend(step.new_token_ids)
    return out


def constrained(request_id: str, spec: StructuredOutputsParams, **params) -> Request:
    params = SamplingParams(**({"max_tokens": 40, "structured_outputs": spec} | params))
    return Request(request_id, [5, 6, 7, 8, 9], params)


def text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode([t for t in ids if t != 2], skip_special_tokens=True)


def test_outputs_follow_the_grammar_and_end_with_it(engine, tokenizer):
    regex = "(fox|dog) [a-z]{3,6}"
    out = run(engine, [
        constrained("re", SO(regex=regex), temperature=1.0, seed=1),
        constrained("ch", SO(choice=("the quick", "lazy")), temperature=0),
        constrained("js", SO(json=json.dumps({"enum": ["a", "b"]})), temperature=0),
    ])  # fmt: skip
    assert re.fullmatch(regex, text(tokenizer, out["re"]))
    assert text(tokenizer, out["ch"]) in ("the quick", "lazy")
    assert json.loads(text(tokenizer, out["js"])) in ("a", "b")
    for ids in out.values():
        assert ids[-1] == 2  # EOS: allowed exactly when the grammar is complete


def test_unconstrained_rows_sample_as_if_alone(engine):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    def plain():
        return [Request(f"p{i}", [9, 8, 7 + i], params) for i in range(3)]

    alone = run(engine, plain())
    mixed = run(engine, [
        *plain(),
        constrained("c1", SO(regex="[a-z ]{20}")),
        constrained("c2", SO(choice=("the lazy dog",)), temperature=1.0, seed=3),
    ])  # fmt: skip
    for request_id, tokens in alone.items():
        assert mixed[request_id] == tokens


def test_forks_each_follow_their_own_matcher(engine, tokenizer):
    regex = "[a-z]{4}-[0-9]{2}"
    parent = constrained("f", SO(regex=regex), temperature=1.0, seed=11, n=4)
    parent.fork_ids = ("f1", "f2", "f3")
    out = run(engine, [parent])
    assert len(out) == 4
    for ids in out.values():
        assert re.fullmatch(regex, text(tokenizer, ids))
    again = constrained("g", SO(regex=regex), temperature=1.0, seed=11, n=4)
    again.fork_ids = ("g1", "g2", "g3")
    twice = run(engine, [again])
    assert [twice[k] for k in ("g", "g1", "g2", "g3")] == [out[k] for k in ("f", "f1", "f2", "f3")]


def test_a_moved_request_replays_its_tokens_and_continues_the_same(engine, tokenizer):
    spec = SO(json=json.dumps({"type": "array", "items": {"enum": ["fox", "dog"]},
                               "minItems": 3, "maxItems": 3}))  # fmt: skip
    whole = run(engine, [constrained("w", spec, temperature=1.0, seed=5, max_tokens=60)])["w"]
    assert len(whole) > 4
    # As after a hand-off or a re-queue: the tokens so far come with the request.
    moved = constrained("m", spec, temperature=1.0, seed=5, max_tokens=60)
    moved.output_token_ids = whole[:3]
    moved.all_token_ids = moved.prompt_token_ids + whole[:3]
    rest = run(engine, [moved])["m"]
    assert whole[:3] + rest == whole
    assert len(json.loads(text(tokenizer, whole))) == 3


def test_a_structural_tag_constrains_what_follows_its_trigger(engine, tokenizer):
    tag = {
        "structures": [{"begin": "<f>", "schema": {"enum": ["fox", "dog"]}, "end": "</f>"}],
        "triggers": ["<f>"],
    }
    spec = backends.check(SO(structural_tag=json.dumps(tag)), AUTO)
    assert spec.backend == "xgrammar"
    with pytest.raises(backends.SpecError, match="xgrammar"):
        backends.check(SO(structural_tag=json.dumps(tag)), StructuredOutputsConfig("guidance"))
    prompt = tokenizer.encode("the quick <f>")
    r = Request("tag", prompt, SamplingParams(max_tokens=30, temperature=1.0, seed=2,
                                              structured_outputs=spec))  # fmt: skip
    out = text(tokenizer, run(engine, [r])["tag"])
    for match in re.finditer("<f>(.*?)</f>", out):
        assert json.loads(match.group(1)) in ("fox", "dog")


def test_a_cut_off_output_ends_with_length(engine):
    r = constrained("len", SO(regex="[a-z]{50}"), max_tokens=5)
    run(engine, [r])
    assert r.status.finish_reason == "length"


def test_a_grammar_that_fails_to_compile_ends_its_request_with_the_error(engine, monkeypatch):
    def broken(compiler, params):
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(backends, "xgrammar_compile", broken)
    engine.add_request(constrained("bad", SO(regex="[a-z]{3}y")))
    errors = []
    while engine.has_unfinished:
        errors += [s.error for s in engine.step() if s.error]
    assert errors and "no compiler today" in errors[0]
    assert "bad" not in engine.kv.req_to_blocks  # its blocks are free


# -- after the reasoning -------------------------------------------------------------------------


def test_the_reasoning_gate_opens_after_the_end_marker():
    gate = ReasoningGate([1, 2], [3, 4], prompt=[3, 4, 9, 1, 2, 7])  # the template opened it
    assert not gate.ended
    fork = gate.fork()
    assert [gate.feed(t) for t in (5, 3, 4, 6, 1, 2, 7)] == [False] * 3 + [True] * 4
    assert gate.ended and not fork.ended  # the fork's tokens are its own
    assert [fork.feed(t) for t in (3, 5, 3, 4, 8)] == [False] * 4 + [True]
    closed = ReasoningGate([1, 2], [3, 4], prompt=[1, 2, 3, 4, 8])  # thinking switched off
    assert closed.ended and closed.feed(5)
    assert not ReasoningGate([1, 2], [3, 4], prompt=[8, 9]).ended  # never opened: still not


def test_the_constraint_starts_where_the_reasoning_ends(engine, tokenizer):
    spec = SO(regex="(fox|dog)", backend="xgrammar", reasoning_parser="deepseek_r1")
    thinking = tokenizer.encode("the quick <think>")
    free = dict(max_tokens=10, temperature=1.0, seed=4, ignore_eos=True)
    # Still reasoning: sampled exactly as without the constraint.
    plain = run(engine, [Request("p", thinking, SamplingParams(**free))])["p"]
    gated = run(engine, [Request("r", thinking, SamplingParams(**free, structured_outputs=spec))])
    assert "</think>" not in text(tokenizer, plain) and gated["r"] == plain
    # A request that reasoned elsewhere (the tokens come with it): constrained after "</think>".
    moved = Request("m", thinking, SamplingParams(max_tokens=30, temperature=1.0, seed=4,
                                                  structured_outputs=spec))  # fmt: skip
    moved.output_token_ids = tokenizer.encode("lazy dog</think>")
    moved.all_token_ids = moved.prompt_token_ids + moved.output_token_ids
    assert re.fullmatch("(fox|dog)", text(tokenizer, run(engine, [moved])["m"]))
    # The template closed the thinking (Qwen3's enable_thinking: false): constrained at once.
    closed = tokenizer.encode("the quick <think></think>")
    r = Request("c", closed, SamplingParams(max_tokens=30, temperature=1.0, seed=4,
                                            structured_outputs=spec))  # fmt: skip
    assert re.fullmatch("(fox|dog)", text(tokenizer, run(engine, [r])["c"]))
