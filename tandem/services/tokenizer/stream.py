"""The tokenizer stage's streaming half over NATS: workers' token batches in, each request's
text deltas out to its gateway; a stop string found here aborts the request everywhere.

A request's streams are opened (`open`) before it is submitted to the scheduler, so its
tokens always find them here; tokens of a request with no stream here belong to another
tokenizer replica or to a request that has ended, and are dropped."""

from __future__ import annotations

import logging
import time

from tandem.services.observability import tracing
from tandem.services.observability.metrics import TokenizerMetrics
from tandem.services.tokenizer.core import DetokenizerHub
from tandem.services.transport.bus import Bus
from tandem.services.transport.subjects import subject
from tandem.v1 import common_pb2, engine_pb2

logger = logging.getLogger(__name__)
WORKER_TIMEOUT = 5.0  # a worker whose heartbeats stopped this long ago no longer counts
ENDED_TTL = 30.0  # seconds an aborted request's final error may still come (see `close`)


class StreamRelay:
    """Holds the streams of the requests this tokenizer submitted, turns their token batches
    into text deltas; knows the live workers' context length from their heartbeats."""

    def __init__(self, bus: Bus, hub: DetokenizerHub, metrics: TokenizerMetrics) -> None:
        self.bus = bus
        self.hub = hub
        self.metrics = metrics
        self.trace_of: dict[str, dict[str, str]] = {}  # request id -> context, until tokens
        self.spans: dict[str, tuple[object, int]] = {}  # request id -> (span, num tokens)
        self._limits: dict[str, tuple[int, float]] = {}  # worker -> (max_model_len, seen)
        self.ended: dict[str, tuple[str, float]] = {}  # request id -> (reply subject, since)

    @property
    def max_model_len(self) -> int:
        """The smallest context length of the live workers (0: none is live)."""
        now = time.monotonic()
        lens = [n for n, seen in self._limits.values() if now - seen < WORKER_TIMEOUT]
        return min(lens) if lens else 0

    def open(self, spec: common_pb2.RequestSpec, carrier: dict[str, str] | None) -> None:
        """Streams for the request and its forks, before it goes to the scheduler;
        `carrier`: the trace context its detokenize span joins."""
        self.hub.open(spec)
        if carrier and tracing.enabled():  # its forks (n > 1) are part of the same trace
            for request_id in (spec.request_id, *spec.fork_ids):
                self.trace_of[request_id] = carrier

    def close(self, request_id: str, error: str | None = None) -> None:
        """Forget the request's stream. A stage that ends a request with an error sends the
        error (its final tokens) and then `abort`, on two subjects whose order NATS does not
        keep between subscriptions: the reply subject is kept a while for it."""
        stream = self.hub.streams.get(request_id)
        if stream is not None:
            now = time.monotonic()
            if len(self.ended) > 4096:
                self.ended = {k: v for k, v in self.ended.items() if now - v[1] < ENDED_TTL}
            self.ended[request_id] = (stream.reply_subject, now)
        self.hub.close(request_id)
        self.trace_of.pop(request_id, None)
        self._end_span(request_id, error=error)

    async def start(self) -> None:
        await self.bus.subscribe(subject("tokens"), engine_pb2.TokenBatch, self._on_tokens)
        await self.bus.subscribe(subject("abort"), engine_pb2.AbortRequest, self._on_abort)
        await self.bus.subscribe(subject("heartbeat"), engine_pb2.Heartbeat, self._on_heartbeat)
        await self.bus.subscribe(subject("worker", "lost"), engine_pb2.WorkerLost, self._on_lost)
        await self.bus.flush()

    async def _on_heartbeat(self, hb: engine_pb2.Heartbeat, raw) -> None:
        self._limits[hb.worker_id] = (hb.max_model_len, time.monotonic())
        for request_id in hb.received_request_ids:  # which decode worker holds a request
            self.hub.received(request_id, hb.worker_id)

    async def _on_lost(self, msg: engine_pb2.WorkerLost, raw) -> None:
        """A worker died: the requests it was producing go back to the scheduler with the
        tokens their clients have, and continue elsewhere, streams unbroken."""
        for spec in self.hub.resumable(msg.worker_id, msg.request_ids):
            await self._requeue(spec, msg.worker_id)

    async def _requeue(self, spec, worker_id: str) -> None:
        logger.warning("%s lost: %s re-queued after %d tokens", worker_id, spec.request_id,
                       len(spec.output_token_ids))  # fmt: skip
        again = engine_pb2.Preempted(request=spec, worker_id=worker_id)
        await self.bus.publish(subject("scheduler", "preempted"), again)

    async def _on_abort(self, msg: engine_pb2.AbortRequest, raw) -> None:
        self.close(msg.request_id, error=f"aborted ({msg.reason})")

    async def _on_tokens(self, batch: engine_pb2.TokenBatch, raw) -> None:
        start = time.perf_counter()
        for tokens in batch.requests:
            await self._relay(tokens, batch.timestamp, batch.worker_id)
        self.metrics.detokenize_seconds.observe(time.perf_counter() - start)

    async def _relay(
        self, tokens: engine_pb2.RequestTokens, produced_at: float = 0.0, worker_id: str = ""
    ) -> None:
        request_id = tokens.request_id
        if tokens.dropped:  # after its tokens: they share this subject and their sender
            spec = self.hub.dropped(request_id, worker_id)
            if spec is not None:
                await self._requeue(spec, worker_id)
            return
        if request_id not in self.hub.streams:
            await self._late_error(tokens)
            return
        relayed = self.hub.on_tokens(tokens, worker_id)
        if relayed is None:
            return
        reply_subject, delta, stopped_here = relayed
        delta.produced_at = produced_at
        if tokens.finish_reason == "abort" and tokens.stop_reason:
            delta.error, delta.error_code = tokens.stop_reason, tokens.error_code or 500
        if self.trace_of or self.spans:
            self._trace(request_id, len(tokens.token_ids), delta)
        await self.bus.publish(reply_subject, delta)
        if stopped_here:
            abort = engine_pb2.AbortRequest(request_id=tokens.request_id, reason="stop_string")
            await self.bus.publish(subject("abort"), abort)

    async def _late_error(self, tokens: engine_pb2.RequestTokens) -> None:
        """The error that ends a request, come after its abort: still the client's answer."""
        reply_subject, since = self.ended.pop(tokens.request_id, ("", 0.0))
        late = time.monotonic() - since < ENDED_TTL
        if reply_subject and late and tokens.finish_reason == "abort" and tokens.error_code:
            error = tokens.stop_reason or "the request failed"
            delta = engine_pb2.TextDelta(
                request_id=tokens.request_id, error=error, error_code=tokens.error_code
            )
            await self.bus.publish(reply_subject, delta)

    def _trace(self, request_id: str, num_tokens: int, delta: engine_pb2.TextDelta) -> None:
        """The request's detokenize span: from its first tokens here to its last."""
        carrier = self.trace_of.pop(request_id, None)
        if carrier is not None:
            attributes = {"gen_ai.request.id": request_id}
            self.spans[request_id] = (
                tracing.start_span("detokenize", tracing.extract(carrier), attributes),
                0,
            )
        if request_id in self.spans:
            span, count = self.spans[request_id]
            self.spans[request_id] = (span, count + num_tokens)
            if delta.finish_reason or delta.error:
                self._end_span(request_id, delta.error or None, delta.finish_reason)

    def _end_span(self, request_id: str, error=None, finish_reason: str = "") -> None:
        span, count = self.spans.pop(request_id, (None, 0))
        if span is not None:
            span.set_attribute("gen_ai.usage.completion_tokens", count)
            if finish_reason:
                span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
            tracing.end_span(span, error)
