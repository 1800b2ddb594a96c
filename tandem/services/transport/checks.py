"""What every message must satisfy before a stage acts on it.

A message that parses as the right protobuf type can still carry values that would take a
stage down (a negative count, a request forked from itself, NaN, an id that breaks a NATS
subject). `check(msg)` raises `InvalidMessage` naming the first bad field; `Bus.subscribe`
runs it on every message it delivers. These are the checks that need nothing but the message;
what needs a stage's own state (token ids against its vocabulary, request ids it must know,
KV tile sizes) is checked by that stage before it acts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable

from google.protobuf.message import Message

from tandem.services.transport import codec
from tandem.services.transport.subjects import subject
from tandem.v1 import common_pb2, engine_pb2

# A worker or gateway id is a NATS subject part: dot-separated words of safe characters.
WORKER_ID = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
MAX_ID_LEN = 256
SPACE = re.compile(r"\s")  # what str.isspace() calls space: every message's ids are checked
FINISH_REASONS = frozenset({"", "stop", "length", "abort"})
SUBMIT_ACKERS = frozenset({"scheduler"})  # the stage that takes submits
DELTAS = re.compile(re.escape(subject("gateway")) + r"\.[A-Za-z0-9_-]+\.deltas")
SHM_DOMAIN_LEN = 4096
MAX_EXPOSITION_LEN = 16 << 20  # characters; a stage's snapshot is a few tens of KB


class InvalidMessage(ValueError):
    """A message whose values a stage must not act on."""


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise InvalidMessage(what)


def _finite(x: float, field: str, low: float | None = None) -> None:
    _require(math.isfinite(x) and (low is None or x >= low), f"{field} must be finite")


def request_id(value: str, field: str = "request_id") -> None:
    """Printable, no spaces, bounded: it is logged, keyed on, echoed to clients."""
    _require(0 < len(value) <= MAX_ID_LEN, f"{field} must be 1-{MAX_ID_LEN} characters")
    _require(value.isprintable() and SPACE.search(value) is None, f"{field}: bad id")


def worker_id(value: str, field: str = "worker_id") -> None:
    _require(len(value) <= MAX_ID_LEN and WORKER_ID.fullmatch(value) is not None,
             f"{field} {value[:64]!r} is not a valid worker id")  # fmt: skip


def _ids(values: Iterable[str], field: str) -> None:
    values = list(values)
    for value in values:
        request_id(value, field)
    _require(len(set(values)) == len(values), f"{field} has duplicates")


def _tokens(ids: Iterable[int], field: str) -> None:
    _require(all(t >= 0 for t in ids), f"{field} must be non-negative token ids")


def request_spec(spec: common_pb2.RequestSpec) -> None:
    request_id(spec.request_id)
    _require(len(spec.prompt_token_ids) > 0, "prompt_token_ids must not be empty")
    _tokens(spec.prompt_token_ids, "prompt_token_ids")
    _tokens(spec.output_token_ids, "output_token_ids")
    if spec.HasField("eos_token_id"):
        _require(spec.eos_token_id >= 0, "eos_token_id must be >= 0")
    _ids(spec.fork_ids, "fork_ids")
    _require(spec.request_id not in spec.fork_ids, "fork_ids name the request itself")
    _finite(spec.arrival_time, "arrival_time")
    if spec.reply_subject:
        _require(
            DELTAS.fullmatch(spec.reply_subject) is not None, "reply_subject is not a gateway's"
        )
    try:
        params = codec.sampling_params_from_proto(spec.params)
    except ValueError as e:
        raise InvalidMessage(str(e)) from None
    _tokens(params.stop_token_ids, "stop_token_ids")


def _heartbeat(hb: engine_pb2.Heartbeat) -> None:
    worker_id(hb.worker_id)
    _require(hb.role in codec.ROLE_NAMES, "role must be prefill or decode")
    _require(hb.num_blocks >= 1, "num_blocks must be >= 1")
    _require(0 <= hb.num_free_blocks <= hb.num_blocks, "num_free_blocks out of range")
    _require(hb.num_running >= 0 and hb.num_waiting >= 0, "negative request counts")
    for name in ("block_size", "max_num_seqs", "max_model_len", "max_num_batched_tokens"):
        _require(getattr(hb, name) >= 1, f"{name} must be >= 1")
    _require(hb.vocab_size >= 1, "vocab_size must be >= 1")
    _finite(hb.timestamp, "timestamp")
    _finite(hb.kv_transfer_seconds, "kv_transfer_seconds", 0.0)
    _ids(hb.received_request_ids, "received_request_ids")


def _submit(msg: engine_pb2.SubmitRequest) -> None:
    _require(msg.HasField("request"), "request missing")
    request_spec(msg.request)
    _require(bool(msg.request.reply_subject), "reply_subject missing")


def _submit_ack(ack: engine_pb2.SubmitAck) -> None:
    request_id(ack.request_id)
    _require(ack.stage in SUBMIT_ACKERS, "stage must be scheduler")


def _plan(plan: engine_pb2.StepPlan) -> None:
    worker_id(plan.worker_id)
    _ids((c.request_id for c in plan.chunks), "chunks.request_id")
    for chunk in plan.chunks:
        _require(chunk.num_tokens >= 1, "num_tokens must be >= 1")
        if chunk.decode_worker_id:
            worker_id(chunk.decode_worker_id, "decode_worker_id")
        if chunk.HasField("request"):
            request_spec(chunk.request)
            _require(chunk.request.request_id == chunk.request_id, "request id differs")


def _report(report: engine_pb2.StepReport) -> None:
    worker_id(report.worker_id)
    for name in ("prefilled_request_ids", "failed_request_ids", "finished_request_ids"):
        _ids(getattr(report, name), name)
    for refused in report.refused:
        request_id(refused.request_id, "refused.request_id")
    if report.HasField("heartbeat"):
        _heartbeat(report.heartbeat)
        _require(report.heartbeat.worker_id == report.worker_id, "heartbeat of another worker")


def _chunk(chunk: engine_pb2.KVBlockChunk) -> None:
    request_id(chunk.request_id)
    _require(chunk.chunk_index < chunk.num_chunks, "chunk_index must be < num_chunks")
    _require(chunk.num_blocks >= 1, "num_blocks must be >= 1")
    _require(chunk.dtype in codec.KV_DTYPES, f"dtype {chunk.dtype[:32]!r} unknown")
    _require(len(chunk.data) > 0 and len(chunk.data) % chunk.num_blocks == 0,
             "data is not num_blocks equal tiles")  # fmt: skip


def _handoff(handoff: engine_pb2.KVHandoff) -> None:
    request_spec(handoff.request)
    spec = handoff.request
    _require(len(spec.output_token_ids) >= 1, "a handed-off request has its first token")
    num_tokens = len(spec.prompt_token_ids) + len(spec.output_token_ids)
    _require(1 <= handoff.num_computed_tokens < num_tokens, "num_computed_tokens out of range")
    _require(
        handoff.num_cached_tokens <= handoff.num_computed_tokens, "num_cached_tokens > computed"
    )
    worker_id(handoff.prefill_worker_id, "prefill_worker_id")
    if handoff.HasField("kv_file"):
        _require(handoff.num_chunks == 0, "KV in a file and in chunks")
        _require(handoff.kv_file.num_blocks >= 1, "kv_file.num_blocks must be >= 1")
        _require(handoff.kv_file.dtype in codec.KV_DTYPES, "kv_file.dtype unknown")


def _probe(probe: engine_pb2.KVProbe) -> None:
    request_spec(probe.request)
    _require(len(probe.shm_domain) <= SHM_DOMAIN_LEN, "shm_domain too long")


def _preempted(msg: engine_pb2.Preempted) -> None:
    request_spec(msg.request)
    worker_id(msg.worker_id)


def _request_tokens(tokens: engine_pb2.RequestTokens) -> None:
    request_id(tokens.request_id)
    _tokens(tokens.token_ids, "token_ids")
    _require(tokens.finish_reason in FINISH_REASONS, "finish_reason unknown")
    _require(not tokens.dropped or not (tokens.token_ids or tokens.finish_reason),
             "a dropped request carries no tokens")  # fmt: skip
    _require(tokens.error_code == 0 or 400 <= tokens.error_code <= 599, "error_code not HTTP's")
    for lp in (*tokens.logprobs, *tokens.prompt_logprobs):
        _tokens((lp.token_id, *lp.top_ids), "logprobs token ids")
        _require(not math.isnan(lp.logprob) and not any(map(math.isnan, lp.top_logprobs)),
                 "logprob is NaN")  # fmt: skip


def _token_batch(batch: engine_pb2.TokenBatch) -> None:
    worker_id(batch.worker_id)
    _finite(batch.timestamp, "timestamp")
    _ids((t.request_id for t in batch.requests), "requests.request_id")
    for tokens in batch.requests:
        _request_tokens(tokens)


def _delta(delta: engine_pb2.TextDelta) -> None:
    request_id(delta.request_id)
    _require(
        delta.error_code == 0 or 400 <= delta.error_code <= 599, "error_code not an HTTP error"
    )
    _require(delta.finish_reason in FINISH_REASONS, "finish_reason unknown")
    _finite(delta.produced_at, "produced_at")


def _kv_events(batch: engine_pb2.KVEventBatch) -> None:
    worker_id(batch.worker_id)


def _stats(stats: engine_pb2.SchedulerStats) -> None:
    _finite(stats.index_lookup_p50_ms, "index_lookup_p50_ms", 0.0)


def _metrics(snapshot: engine_pb2.MetricsSnapshot) -> None:
    """The exposition itself is parsed where it is used (`merge_expositions` at scrape time,
    which skips one that does not parse): parsing every snapshot here cost the gateway more
    CPU than its token streams."""
    request_id(snapshot.instance, "instance")
    request_id(snapshot.stage, "stage")
    _finite(snapshot.timestamp, "timestamp")
    _require(len(snapshot.exposition) <= MAX_EXPOSITION_LEN, "exposition too long")


def _worker_lost(m: engine_pb2.WorkerLost) -> None:
    worker_id(m.worker_id)
    _ids(m.request_ids, "request_ids")


def _lora_update(m) -> None:
    _require(bool(m.lora_name), "lora_name is empty")
    _require(m.unload or bool(m.lora_path), "lora_path is empty")


CHECKS: dict[type[Message], Callable] = {
    engine_pb2.SubmitRequest: _submit,
    engine_pb2.SubmitAck: _submit_ack,
    engine_pb2.AbortRequest: lambda m: request_id(m.request_id),
    engine_pb2.Heartbeat: _heartbeat,
    engine_pb2.StepPlan: _plan,
    engine_pb2.StepReport: _report,
    engine_pb2.KVBlockChunk: _chunk,
    engine_pb2.KVHandoff: _handoff,
    engine_pb2.KVProbe: _probe,
    engine_pb2.LocalPrefill: lambda m: request_spec(m.request),
    engine_pb2.Preempted: _preempted,
    engine_pb2.DrainRequest: lambda m: worker_id(m.worker_id),
    engine_pb2.WorkerLost: _worker_lost,
    engine_pb2.TokenBatch: _token_batch,
    engine_pb2.TextDelta: _delta,
    engine_pb2.KVEventBatch: _kv_events,
    engine_pb2.KVResyncRequest: lambda m: worker_id(m.worker_id),
    engine_pb2.ResetPrefixCache: lambda m: None,
    engine_pb2.LoRAAdapterUpdate: _lora_update,
    engine_pb2.SchedulerStats: _stats,
    engine_pb2.MetricsSnapshot: _metrics,
}


def check(msg: Message) -> None:
    """Raise InvalidMessage when `msg` must not be acted on."""
    CHECKS[type(msg)](msg)
