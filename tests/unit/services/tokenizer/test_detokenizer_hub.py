"""Token batches become text deltas; a stop string ends the request at the tokenizer."""

import pytest

from tandem.services.tokenizer.core import DetokenizerHub, TokenizerCore
from tandem.v1 import common_pb2, engine_pb2


@pytest.fixture(scope="module")
def core(tiny_llama):
    return TokenizerCore(tiny_llama)


def _spec(rid, stop=()):
    return common_pb2.RequestSpec(
        request_id=rid, reply_subject=f"gw.{rid}", params=common_pb2.SamplingParams(stop=stop)
    )


def _feed(hub, rid, ids, finish_at=None):
    out = []
    for i, t in enumerate(ids):
        reason = "length" if i == finish_at else ""
        subj, delta, stopped = hub.on_tokens(
            engine_pb2.RequestTokens(request_id=rid, token_ids=[t], finish_reason=reason)
        )
        out.append((subj, delta, stopped))
        if delta.finish_reason:
            break
    return out


def test_deltas_concatenate_to_the_text(core):
    hub = DetokenizerHub(core)
    ids = core.tokenize("héllo 日本語 wörld", add_special_tokens=False)
    hub.open(_spec("a"))
    out = _feed(hub, "a", ids, finish_at=len(ids) - 1)
    assert {s for s, _, _ in out} == {"gw.a"}
    assert "".join(d.text for _, d, _ in out) == core.detokenize(ids)
    assert out[-1][1].finish_reason == "length" and "a" not in hub.streams


def test_stop_string_ends_the_request_here(core):
    hub = DetokenizerHub(core)
    ids = core.tokenize("one two STOP three four", add_special_tokens=False)
    hub.open(_spec("b", stop=["STOP"]))
    out = _feed(hub, "b", ids)
    _, last, stopped = out[-1]
    assert stopped and last.finish_reason == "stop" and last.stop_reason == "STOP"
    assert "".join(d.text for _, d, _ in out) == "one two "
    assert "b" not in hub.streams
    with pytest.raises(KeyError):
        hub.on_tokens(engine_pb2.RequestTokens(request_id="b", token_ids=[5]))


def test_a_stream_takes_each_output_position_once(core):
    """Tokens sent twice, or by a worker the request was taken from, are dropped; a request
    placed again on the same worker streams on."""
    hub = DetokenizerHub(core)
    hub.open(_spec("a"))

    def send(first, ids, worker="decode-0"):
        tokens = engine_pb2.RequestTokens(request_id="a", token_ids=ids, first_output_index=first)
        out = hub.on_tokens(tokens, worker)
        return None if out is None else list(out[1].token_ids)

    assert send(0, [10, 11]) == [10, 11]
    assert send(0, [10, 11]) is None  # again
    hub.received("a", "decode-0")
    (spec,) = hub.resumable("decode-0")  # declared lost: re-queued with its 2 tokens
    assert list(spec.output_token_ids) == [10, 11]
    assert send(2, [12], worker="prefill-0") == [12]  # re-prefilled: its next token
    assert send(2, [12]) is None  # the old holder, late
    assert send(1, [11, 12, 13]) == [13]  # partly new


def test_a_request_a_lost_worker_dropped_is_re_queued_once_whichever_came_first(core):
    """A worker declared lost drops its requests and says which. The WorkerLost message
    re-queues those the tokenizer knew it held; its own word re-queues the rest (a hand-off
    under way, a receipt not yet heard of), never one twice; a request placed back on that
    worker can be lost there again."""
    hub = DetokenizerHub(core)
    for rid in ("a", "b", "c"):
        hub.open(_spec(rid))
        hub.on_tokens(engine_pb2.RequestTokens(request_id=rid, token_ids=[10]), "prefill-0")
    hub.received("a", "decode-0")  # b's receipt is still on its way; c never got one token
    hub.open(_spec("d"))
    assert [s.request_id for s in hub.resumable("decode-0")] == ["a"]
    assert hub.dropped("a", "decode-0") is None  # re-queued already
    assert list(hub.dropped("b", "decode-0").output_token_ids) == [10]
    assert hub.dropped("b", "decode-0") is None
    assert hub.dropped("d", "decode-0") is None  # no token: the scheduler's to place again
    late = engine_pb2.RequestTokens(request_id="b", token_ids=[11], first_output_index=1)
    hub.on_tokens(late, "decode-0")  # a token the lost worker sent before it stopped
    assert hub.dropped("b", "decode-0") is None
    hub.on_tokens(engine_pb2.RequestTokens(request_id="a", token_ids=[12]), "prefill-0")
    hub.received("a", "decode-0")  # placed back there, and lost there again
    assert list(hub.dropped("a", "decode-0").output_token_ids) == [10, 12]


def test_requests_handed_to_a_killed_worker_are_re_queued_once_with_their_tokens(core):
    """A worker killed mid hand-off never reports its receipt nor says it dropped them: the
    scheduler's in-transit list (WorkerLost.request_ids) re-queues those with the prefill
    worker's first token, once; one another decode worker holds stays there."""
    hub = DetokenizerHub(core)
    for rid in ("a", "b", "c"):
        hub.open(_spec(rid))
        hub.on_tokens(engine_pb2.RequestTokens(request_id=rid, token_ids=[10]), "prefill-0")
    hub.received("c", "decode-0")
    assert hub.resumable("decode-1") == []  # without the list: nobody held them
    (spec,) = hub.resumable("decode-1", ["a", "c"])
    assert spec.request_id == "a" and list(spec.output_token_ids) == [10]
    assert hub.resumable("decode-1", ["a", "c"]) == []  # never twice
    assert hub.dropped("a", "decode-1") is None


class _Bus:
    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []

    async def publish(self, subj, msg, headers=None) -> None:
        self.sent.append((subj, msg))


@pytest.mark.parametrize("abort_first", [True, False])
def test_a_request_ended_with_an_error_gets_it_whichever_comes_first(core, abort_first):
    """A stage that refuses a request sends its error (final tokens), then `abort`; the two
    subjects' handlers may run in either order: the client gets the error either way."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from tandem.services.observability.metrics import TokenizerMetrics
    from tandem.services.tokenizer.stream import StreamRelay

    async def scenario() -> list:
        bus = _Bus()
        relay = StreamRelay(bus, DetokenizerHub(core), TokenizerMetrics(CollectorRegistry()))
        relay.open(_spec("r"), None)
        error = engine_pb2.TokenBatch(worker_id="scheduler")
        error.requests.add(request_id="r", finish_reason="abort", stop_reason="full",
                           error_code=503)  # fmt: skip
        abort = engine_pb2.AbortRequest(request_id="r", reason="error")
        if abort_first:
            await relay._on_abort(abort, None)
        await relay._on_tokens(error, None)
        if not abort_first:
            await relay._on_abort(abort, None)
        await relay._on_tokens(error, None)  # once more: no second answer
        return bus.sent

    sent = asyncio.run(scenario())
    assert [(subj, d.error, d.error_code) for subj, d in sent] == [("gw.r", "full", 503)]
