"""Every message is checked before a stage acts on it: the checks cover every message on the
subject table, pass what the stages really send, and refuse what used to take one down."""

from __future__ import annotations

import math

import pytest

from tandem.engine.request import Request, SamplingParams
from tandem.services.transport import checks, codec
from tandem.services.transport.subjects import SUBJECTS, Role, lookup, permissions, subject
from tandem.v1 import engine_pb2

DELTAS = subject("gateway", "gw-1", "deltas")


def spec(**fields):
    request = Request("r1", [1, 2, 3], SamplingParams(max_tokens=4))
    out = codec.request_to_spec(request, DELTAS)
    for name, value in fields.items():
        field = getattr(out, name)
        if isinstance(value, list):
            del field[:]
            field.extend(value)
        else:
            setattr(out, name, value)
    return out


def heartbeat(**fields) -> engine_pb2.Heartbeat:
    values = dict(worker_id="decode-0.1", role=engine_pb2.WORKER_ROLE_DECODE, num_blocks=8,
                  num_free_blocks=8, block_size=16, max_num_seqs=4, max_model_len=256,
                  max_num_batched_tokens=64, vocab_size=256, timestamp=1.0)  # fmt: skip
    return engine_pb2.Heartbeat(**(values | fields))


def test_every_message_on_the_subject_table_has_checks():
    assert {row.message for row in SUBJECTS} <= set(checks.CHECKS)


def test_a_subject_with_a_dotted_worker_id_is_found_and_an_unknown_one_is_not():
    assert lookup(subject("prefill", "prefill-0.1", "plan")).message is engine_pb2.StepPlan
    assert lookup(subject("decode", "d", "kv")).message is engine_pb2.KVBlockChunk
    with pytest.raises(KeyError):
        lookup(subject("prefill", "p", "nope"))


def test_no_role_may_publish_what_it_never_sends():
    assert not any("plan" in s for s in permissions(Role.GATEWAY)["publish"]["allow"])
    for worker in (Role.PREFILL, Role.DECODE):
        assert subject("submit") not in permissions(worker)["publish"]["allow"]


VALID = [
    engine_pb2.SubmitRequest(request=spec()),
    heartbeat(),
    engine_pb2.StepPlan(
        worker_id="prefill-0",
        chunks=[
            engine_pb2.ScheduledChunk(
                request_id="r1", num_tokens=3, request=spec(), decode_worker_id="decode-0"
            )
        ],
    ),  # fmt: skip
    engine_pb2.KVHandoff(
        request=spec(output_token_ids=[7]),
        num_computed_tokens=3,
        num_chunks=1,
        prefill_worker_id="prefill-0",
    ),  # fmt: skip
    engine_pb2.KVBlockChunk(
        request_id="r1", num_chunks=1, num_blocks=2, dtype="float32", data=b"\0" * 64
    ),  # fmt: skip
    engine_pb2.TokenBatch(
        worker_id="decode-0",
        requests=[engine_pb2.RequestTokens(request_id="r1", token_ids=[3], finish_reason="length")],
    ),
    engine_pb2.MetricsSnapshot(
        instance="decode-0", stage="decode", exposition="# TYPE a counter\na_total 1.0\n"
    ),  # fmt: skip
]


@pytest.mark.parametrize("msg", VALID, ids=lambda m: type(m).__name__)
def test_what_the_stages_send_passes(msg):
    checks.check(msg)


INVALID = {
    "an empty heartbeat": engine_pb2.Heartbeat(),
    "NaN in a heartbeat": heartbeat(kv_transfer_seconds=math.nan),
    "a worker id with a space": heartbeat(worker_id="decode 0"),
    "a wildcard worker id": heartbeat(worker_id="decode.*"),
    "more free blocks than blocks": heartbeat(num_free_blocks=9),
    "no vocabulary": heartbeat(vocab_size=0),
    "a request forked from itself": engine_pb2.SubmitRequest(request=spec(fork_ids=["r1"])),
    "duplicate forks": engine_pb2.SubmitRequest(request=spec(fork_ids=["f", "f"])),
    "a negative prompt token": engine_pb2.SubmitRequest(request=spec(prompt_token_ids=[1, -5])),
    "an empty prompt": engine_pb2.SubmitRequest(request=spec(prompt_token_ids=[])),
    "a reply subject that is not a gateway's": engine_pb2.SubmitRequest(
        request=spec(reply_subject=subject("prefill", "p", "plan"))
    ),
    "a submit nobody can answer": engine_pb2.SubmitRequest(request=spec(reply_subject="")),
    "bad sampling values": engine_pb2.SubmitRequest(request=spec(arrival_time=math.inf)),
    "a hand-off with nothing computed": engine_pb2.KVHandoff(
        request=spec(output_token_ids=[7]), num_computed_tokens=0, prefill_worker_id="p"
    ),
    "a hand-off without its first token": engine_pb2.KVHandoff(
        request=spec(), num_computed_tokens=3, prefill_worker_id="p"
    ),
    "a plan with a request twice": engine_pb2.StepPlan(worker_id="p", chunks=[
        engine_pb2.ScheduledChunk(request_id="r1", num_tokens=1),
        engine_pb2.ScheduledChunk(request_id="r1", num_tokens=1)]),  # fmt: skip
    "a plan of zero tokens": engine_pb2.StepPlan(
        worker_id="p", chunks=[engine_pb2.ScheduledChunk(request_id="r1", num_tokens=0)]
    ),
    "a chunk past its count": engine_pb2.KVBlockChunk(request_id="r1", chunk_index=1,
                                                      num_chunks=1, num_blocks=1,
                                                      dtype="float32", data=b"\0" * 4),
    "a chunk of an unknown dtype": engine_pb2.KVBlockChunk(request_id="r1", num_chunks=1,
                                                           num_blocks=1, dtype="int8",
                                                           data=b"\0"),
    "a report with another worker's heartbeat": engine_pb2.StepReport(
        worker_id="prefill-0", heartbeat=heartbeat()
    ),
    "an unknown finish reason": engine_pb2.TokenBatch(worker_id="d", requests=[
        engine_pb2.RequestTokens(request_id="r1", finish_reason="exploded")]),  # fmt: skip
    "a request id with a newline": engine_pb2.AbortRequest(request_id="r\n1"),
    "a lost worker's request id with a space": engine_pb2.WorkerLost(
        worker_id="decode-0", request_ids=["r 1"]
    ),
    "a snapshot of no instance": engine_pb2.MetricsSnapshot(stage="decode", exposition=""),
    "a snapshot past the size bound": engine_pb2.MetricsSnapshot(
        instance="x", stage="decode", exposition="#" * (checks.MAX_EXPOSITION_LEN + 1)
    ),
    "an error code that is not HTTP's": engine_pb2.TextDelta(request_id="r1", error_code=7),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(INVALID))
def test_what_used_to_take_a_stage_down_is_refused(name):
    with pytest.raises(checks.InvalidMessage):
        checks.check(INVALID[name])
