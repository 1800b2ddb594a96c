"""The tokenizer stage's streaming half over NATS: workers' token batches in, each request's
text deltas out to its gateway; a stop string found here aborts the request everywhere."""

from __future__ import annotations

import logging
import time

from tandem.services.observability import tracing
from tandem.services.observability.metrics import TokenizerMetrics
from tandem.services.tokenizer.core import DetokenizerHub
from tandem.services.transport.bus import Bus, SubmitInbox, Tombstones
from tandem.services.transport.subjects import subject
from tandem.v1 import engine_pb2

logger = logging.getLogger(__name__)
EARLY_TTL = 30.0  # seconds an orphan token message waits for its request's submission


class StreamRelay:
    """Opens a stream per submitted request, turns token batches into text deltas.

    Tokens can overtake their submission (they come from another publisher), so tokens of
    a request not seen yet wait briefly and are replayed when it arrives."""

    def __init__(self, bus: Bus, hub: DetokenizerHub, metrics: TokenizerMetrics) -> None:
        self.bus = bus
        self.hub = hub
        self.metrics = metrics
        self.trace_of: dict[str, dict[str, str]] = {}  # request id -> context, until tokens
        self.spans: dict[str, tuple[object, int]] = {}  # request id -> (span, num tokens)
        # request id -> (since, [(tokens, produced_at, worker id)])
        self.early: dict[str, tuple[float, list[tuple]]] = {}
        self.ended = Tombstones()  # stopped here or aborted: later tokens are dropped
        self.submits = SubmitInbox(bus, "tokenizer")

    async def start(self) -> None:
        await self.bus.subscribe(subject("submit"), engine_pb2.SubmitRequest, self._on_submit)
        await self.bus.subscribe(subject("tokens"), engine_pb2.TokenBatch, self._on_tokens)
        await self.bus.subscribe(subject("abort"), engine_pb2.AbortRequest, self._on_abort)
        await self.bus.subscribe(subject("heartbeat"), engine_pb2.Heartbeat, self._on_heartbeat)
        await self.bus.subscribe(subject("worker", "lost"), engine_pb2.WorkerLost, self._on_lost)
        await self.bus.flush()

    async def _on_heartbeat(self, hb: engine_pb2.Heartbeat, raw) -> None:
        for request_id in hb.received_request_ids:  # which decode worker holds a request
            self.hub.received(request_id, hb.worker_id)

    async def _on_lost(self, msg: engine_pb2.WorkerLost, raw) -> None:
        """A worker died: the requests it was producing go back to the scheduler with the
        tokens their clients have, and continue elsewhere, streams unbroken."""
        for spec in self.hub.resumable(msg.worker_id):
            logger.warning("%s lost: %s re-queued after %d tokens", msg.worker_id,
                           spec.request_id, len(spec.output_token_ids))  # fmt: skip
            again = engine_pb2.Preempted(request=spec, worker_id=msg.worker_id)
            await self.bus.publish(subject("scheduler", "preempted"), again)

    async def _on_submit(self, msg: engine_pb2.SubmitRequest, raw) -> None:
        if not await self.submits.accept(msg, raw):
            return
        self.hub.open(msg.request)
        if tracing.enabled():
            carrier = dict(raw.headers or msg.request.trace_context or {})
            if carrier:  # its forks (n > 1) are part of the same trace
                for request_id in (msg.request.request_id, *msg.request.fork_ids):
                    self.trace_of[request_id] = carrier
        for request_id in (msg.request.request_id, *msg.request.fork_ids):
            _, waiting = self.early.pop(request_id, (0.0, []))
            for tokens, produced_at, worker_id in waiting:
                await self._relay(tokens, produced_at, worker_id)

    async def _on_abort(self, msg: engine_pb2.AbortRequest, raw) -> None:
        self.hub.close(msg.request_id)
        self.early.pop(msg.request_id, None)
        self.ended.add(msg.request_id)
        self.trace_of.pop(msg.request_id, None)
        self._end_span(msg.request_id, error=f"aborted ({msg.reason})")

    async def _on_tokens(self, batch: engine_pb2.TokenBatch, raw) -> None:
        start = time.perf_counter()
        for tokens in batch.requests:
            await self._relay(tokens, batch.timestamp, batch.worker_id)
        self.metrics.detokenize_seconds.observe(time.perf_counter() - start)

    async def _relay(
        self, tokens: engine_pb2.RequestTokens, produced_at: float = 0.0, worker_id: str = ""
    ) -> None:
        request_id = tokens.request_id
        if request_id not in self.hub.streams:
            if request_id not in self.ended:
                self._hold(tokens, produced_at, worker_id)
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
            self.ended.add(tokens.request_id)
            abort = engine_pb2.AbortRequest(request_id=tokens.request_id, reason="stop_string")
            await self.bus.publish(subject("abort"), abort)

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

    def _hold(self, tokens: engine_pb2.RequestTokens, produced_at: float, worker_id: str) -> None:
        now = time.monotonic()
        if len(self.early) > 1024:  # requests that never came
            self.early = {k: v for k, v in self.early.items() if now - v[0] < EARLY_TTL}
        entry = (tokens, produced_at, worker_id)
        self.early.setdefault(tokens.request_id, (now, []))[1].append(entry)
