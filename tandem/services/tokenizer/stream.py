"""The tokenizer stage's streaming half over NATS: workers' token batches in, each request's
text deltas out to its gateway; a stop string found here aborts the request everywhere."""

from __future__ import annotations

import logging
import time

from tandem.services.common.bus import Bus, subject
from tandem.services.common.worker import Tombstones
from tandem.services.tokenizer.core import DetokenizerHub
from tandem.v1 import engine_pb2

logger = logging.getLogger(__name__)
EARLY_TTL = 30.0  # seconds an orphan token message waits for its request's submission


class StreamRelay:
    """Opens a stream per submitted request, turns token batches into text deltas.

    Tokens can overtake their submission (they come from another publisher), so tokens of
    a request not seen yet wait briefly and are replayed when it arrives."""

    def __init__(self, bus: Bus, hub: DetokenizerHub) -> None:
        self.bus = bus
        self.hub = hub
        self.early: dict[str, tuple[float, list[engine_pb2.RequestTokens]]] = {}
        self.ended = Tombstones()  # stopped here or aborted: later tokens are dropped

    async def start(self) -> None:
        await self.bus.subscribe(subject("submit"), engine_pb2.SubmitRequest, self._on_submit)
        await self.bus.subscribe(subject("tokens"), engine_pb2.TokenBatch, self._on_tokens)
        await self.bus.subscribe(subject("abort"), engine_pb2.AbortRequest, self._on_abort)
        await self.bus.flush()

    async def _on_submit(self, msg: engine_pb2.SubmitRequest, raw) -> None:
        self.hub.open(msg.request)
        _, waiting = self.early.pop(msg.request.request_id, (0.0, []))
        for tokens in waiting:
            await self._relay(tokens)

    async def _on_abort(self, msg: engine_pb2.AbortRequest, raw) -> None:
        self.hub.close(msg.request_id)
        self.early.pop(msg.request_id, None)
        self.ended.add(msg.request_id)

    async def _on_tokens(self, batch: engine_pb2.TokenBatch, raw) -> None:
        for tokens in batch.requests:
            await self._relay(tokens)

    async def _relay(self, tokens: engine_pb2.RequestTokens) -> None:
        if tokens.request_id not in self.hub.streams:
            if tokens.request_id not in self.ended:
                self._hold(tokens)
            return
        reply_subject, delta, stopped_here = self.hub.on_tokens(tokens)
        if tokens.finish_reason == "abort" and tokens.stop_reason:
            delta.error, delta.error_code = tokens.stop_reason, 500  # a worker gave up on it
        await self.bus.publish(reply_subject, delta)
        if stopped_here:
            self.ended.add(tokens.request_id)
            abort = engine_pb2.AbortRequest(request_id=tokens.request_id, reason="stop_string")
            await self.bus.publish(subject("abort"), abort)

    def _hold(self, tokens: engine_pb2.RequestTokens) -> None:
        now = time.monotonic()
        if len(self.early) > 1024:  # requests that never came
            self.early = {k: v for k, v in self.early.items() if now - v[0] < EARLY_TTL}
        self.early.setdefault(tokens.request_id, (now, []))[1].append(tokens)
