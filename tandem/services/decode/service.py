"""The decode worker: receives prefilled requests and their KV blocks from prefill workers,
runs continuous batching over them, and publishes one token batch per step. Out of blocks,
it preempts by recompute: the request goes back to the central scheduler with its tokens."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

import torch

from tandem.engine.config import EngineConfig
from tandem.engine.request import Request
from tandem.services.common import codec
from tandem.services.common.bus import Bus, KVAssembler, subject
from tandem.services.common.worker import (
    HEARTBEAT_INTERVAL,
    EngineThread,
    Tombstones,
    heartbeat,
    request_tokens,
)
from tandem.v1 import engine_pb2

logger = logging.getLogger(__name__)
ROLE = engine_pb2.WORKER_ROLE_DECODE


@dataclass(slots=True)
class Arrival:
    """A handed-off request waiting for room in this worker's batch."""

    request: Request
    kv: torch.Tensor
    num_computed_tokens: int


class DecodeWorker:
    """Lifecycle: start (load the engine, subscribe, announce) -> decode loop -> shutdown."""

    def __init__(self, config: EngineConfig, bus: Bus, worker_id: str) -> None:
        self.bus = bus
        self.worker_id = worker_id
        self.thread = EngineThread(config)
        self.arrivals: deque[Arrival] = deque()
        self.received_ids: list[str] = []  # since the last heartbeat
        self.aborted = Tombstones()
        self.wake = asyncio.Event()

    async def start(self) -> None:
        self.engine = await self.thread.start()
        self.assembler = KVAssembler(self.engine.runner.kv_tile_shape)
        base = subject("decode", self.worker_id)
        await self.bus.subscribe(f"{base}.kv", engine_pb2.KVBlockChunk, self._on_chunk)
        await self.bus.subscribe(f"{base}.handoff", engine_pb2.KVHandoff, self._on_handoff)
        await self.bus.subscribe(subject("abort"), engine_pb2.AbortRequest, self._on_abort)
        await self.bus.flush()
        logger.info("decode worker %s ready", self.worker_id)

    async def _on_chunk(self, chunk: engine_pb2.KVBlockChunk, raw) -> None:
        if chunk.request_id not in self.aborted:
            self.assembler.add(chunk)
        await raw.respond(b"")  # the ack that paces the sender

    async def _on_handoff(self, handoff: engine_pb2.KVHandoff, raw) -> None:
        request_id = handoff.request.request_id
        ack = engine_pb2.KVHandoffAck(accepted=True)
        if request_id in self.aborted:
            self.assembler.drop(request_id)
        elif not self.assembler.complete(request_id, handoff.num_chunks):
            self.assembler.drop(request_id)
            ack = engine_pb2.KVHandoffAck(accepted=False, error="KV chunks missing")
        else:
            request = codec.request_from_spec(handoff.request)
            request.num_cached_tokens = handoff.num_cached_tokens
            kv = self.assembler.take(request_id)
            self.arrivals.append(Arrival(request, kv, handoff.num_computed_tokens))
            self.wake.set()
        self.received_ids.append(request_id)
        await raw.respond(ack.SerializeToString())

    async def _on_abort(self, msg: engine_pb2.AbortRequest, raw) -> None:
        self.aborted.add(msg.request_id)
        self.assembler.drop(msg.request_id)
        self.arrivals = deque(a for a in self.arrivals if a.request.request_id != msg.request_id)
        await self.thread.call(self.engine.abort, msg.request_id)

    async def run(self) -> None:
        """Admit arrivals while they fit, step while anything runs, heartbeat throughout."""
        beats = asyncio.create_task(self._heartbeats())
        try:
            while True:
                if self.arrivals:
                    await self.thread.call(self._admit)
                if self.engine.has_unfinished:
                    await self._step()
                else:
                    self.wake.clear()
                    await self.wake.wait()
                if self.received_ids:  # tell the scheduler soon: they stop being in transit
                    await self._heartbeat()
        finally:
            beats.cancel()

    async def _heartbeats(self) -> None:
        while True:
            await self._heartbeat()
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    def _admit(self) -> None:
        """On the engine thread: move arrivals into the batch in order while they fit."""
        while self.arrivals:
            a = self.arrivals[0]
            if a.request.request_id in self.aborted:
                self.arrivals.popleft()
                continue
            if not self.engine.add_prefilled_request(a.request, a.kv, a.num_computed_tokens):
                return
            self.arrivals.popleft()

    async def _step(self) -> None:
        outputs, preempted = await self.thread.call(self._step_on_thread)
        if outputs:
            batch = engine_pb2.TokenBatch(worker_id=self.worker_id, step_id=self.engine.num_steps)
            batch.requests.extend(request_tokens(o) for o in outputs)
            await self.bus.publish(subject("tokens"), batch)
        for request in preempted:
            logger.info("preempted %s: back to the scheduler", request.request_id)
            msg = engine_pb2.Preempted(
                request=codec.request_to_spec(request), worker_id=self.worker_id
            )
            await self.bus.publish(subject("scheduler", "preempted"), msg)

    def _step_on_thread(self):
        outputs = self.engine.step()
        return outputs, self.engine.take_preempted()

    async def _heartbeat(self) -> None:
        msg = heartbeat(self.engine, self.worker_id, ROLE, num_waiting=len(self.arrivals))
        msg.received_request_ids.extend(self.received_ids)
        self.received_ids.clear()
        await self.bus.publish(subject("heartbeat"), msg)

    async def shutdown(self) -> None:
        self.thread.shutdown()
        await self.bus.close()
