"""One request's failure is that request's: a step that raises ends the requests it concerns
with the error and the engine goes on with the rest; a fault of the worker itself (out of
memory) still ends the step. Token ids outside the vocabulary never reach a step."""

from __future__ import annotations

import pytest

from tandem.engine.config import CacheConfig, EngineConfig, ModelConfig
from tandem.engine.core import EngineCore
from tandem.engine.request import Request, SamplingParams

VOCAB = 256


@pytest.fixture(scope="module")
def engine(tiny_llama):
    model = ModelConfig(tiny_llama, dtype="float32", max_model_len=128)
    return EngineCore(EngineConfig(model, CacheConfig(num_gpu_blocks_override=64)))


def request(request_id: str, prompt=(5, 6, 7, 8), **params) -> Request:
    params = SamplingParams(**({"max_tokens": 6, "temperature": 0, "ignore_eos": True} | params))
    return Request(request_id, list(prompt), params)


def run(engine: EngineCore, requests: list[Request]) -> dict[str, list[int] | str]:
    """Each request's tokens, or its error."""
    out: dict[str, list[int] | str] = {r.request_id: [] for r in requests}
    for r in requests:
        engine.add_request(r)
    while engine.has_unfinished:
        for step in engine.step():
            rid = step.request.request_id
            out[rid] = step.error if step.error is not None else out[rid] + step.new_token_ids
    return out


def test_a_step_that_raises_fails_the_request_it_concerns_and_the_rest_go_on(engine, monkeypatch):
    reference = run(engine, [request("a"), request("b", prompt=(9, 10))])
    real = engine.runner.execute

    def execute(requests, *args, **kwargs):
        if any(r.request_id == "poison" for r in requests):
            raise IndexError("index 60000 is out of bounds")
        return real(requests, *args, **kwargs)

    monkeypatch.setattr(engine.runner, "execute", execute)
    out = run(engine, [request("a"), request("poison"), request("b", prompt=(9, 10))])
    assert out["a"] == reference["a"] and out["b"] == reference["b"]
    assert "IndexError" in out["poison"]
    assert engine.kv.num_free_blocks == engine.runner.info.num_blocks
    assert not engine.scheduler.requests


def test_a_fault_of_the_worker_itself_still_ends_the_step(engine, monkeypatch):
    def execute(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(engine.runner, "execute", execute)
    engine.add_request(request("oom"))
    with pytest.raises(MemoryError):
        engine.step()
    monkeypatch.undo()
    engine.abort("oom")


@pytest.mark.parametrize(
    "bad",
    [
        dict(prompt=(1, VOCAB)),
        dict(stop_token_ids=[60000], min_tokens=2),
        dict(allowed_token_ids=[VOCAB]),
        dict(logit_bias={VOCAB: 1.0}),
    ],
    ids=["prompt", "stop_token_ids", "allowed_token_ids", "logit_bias"],
)
def test_token_ids_outside_the_vocabulary_are_refused_before_any_step(engine, bad):
    prompt = bad.pop("prompt", (5, 6))
    with pytest.raises(ValueError, match=f"0, {VOCAB}"):
        engine.add_request(request("oov", prompt=prompt, **bad))
    assert not engine.scheduler.requests


def test_a_request_that_clashes_with_its_forks_or_a_held_one_is_refused(engine):
    forked = request("f")
    forked.fork_ids = ("f",)
    with pytest.raises(ValueError, match="fork"):
        engine.add_request(forked)
    handed_back = request("g")
    handed_back.output_token_ids = [VOCAB + 1]
    with pytest.raises(ValueError, match="output token ids"):
        engine.add_request(handed_back)
    engine.add_request(request("h"))
    with pytest.raises(ValueError, match="duplicate"):
        engine.add_request(request("h"))
    engine.abort("h")
