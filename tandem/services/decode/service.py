"""The decode worker: receives prefilled requests and their KV blocks from prefill workers,
runs continuous batching over them, and publishes one token batch per step. Out of blocks,
it preempts by recompute: the request goes back to the central scheduler with its tokens.

Before a prefill worker sends a request's KV, it asks (KVProbe) which leading blocks this
worker's prefix cache holds already; they are reserved for the request until it arrives,
and only the rest crosses the wire: in acked chunks over NATS, or, from a prefill worker on
this machine, as one file in shared memory (kv_shm).

A request whose prompt is short (or mostly cached here) comes from the central scheduler
itself (LocalPrefill, conditional disaggregation): this worker prefills it in its own steps,
next to the batch's decoding."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from tandem.engine.block_pool import Block
from tandem.engine.config import EngineConfig
from tandem.engine.core import StepOutput
from tandem.engine.kv_quant import is_fp8, requantize
from tandem.engine.request import Request, RequestStatus
from tandem.services.observability import tracing
from tandem.services.transport import codec, kv_shm
from tandem.services.transport.bus import Bus
from tandem.services.transport.kv_transfer import KVAssembler
from tandem.services.transport.subjects import subject
from tandem.services.worker.core_loan import CoreLoan
from tandem.services.worker.shell import WorkerShell
from tandem.utils import cdiv
from tandem.v1 import engine_pb2

logger = logging.getLogger(__name__)
RESERVE_LEASE = 30.0  # seconds a probe's reserved blocks wait for their hand-off


@dataclass(slots=True)
class Arrival:
    """A handed-off request waiting for room in this worker's batch."""

    request: Request
    kv: list[torch.Tensor]  # the blocks that came over the wire (after the reused ones)
    num_computed_tokens: int
    reused: list[Block]


class DecodeWorker(WorkerShell):
    """Admits arrivals while they fit, steps while anything runs."""

    role = engine_pb2.WORKER_ROLE_DECODE

    def __init__(self, config: EngineConfig, bus: Bus, worker_id: str) -> None:
        super().__init__(config, bus, worker_id)
        self.arrivals: deque[Arrival] = deque()
        self.local: deque[Request] = deque()  # placed here to prefill, not in the engine yet
        self.local_since: dict[str, int] = {}  # traced, prefilling here: id -> since (ns)
        self.assembler: KVAssembler | None = None  # made once the engine's tile shape is known
        # probed, not arrived yet: id -> (the cached blocks held for it, since when)
        self.reserved: dict[str, tuple[list[Block], float]] = {}
        self.received_ids: list[str] = []  # since the last heartbeat
        self.num_kv_blocks_received = 0
        self.wake = asyncio.Event()
        # request id -> (its decode span, its trace context), for traced requests only
        self.spans: dict[str, tuple[object, dict[str, str]]] = {}
        self.loan: CoreLoan | None = None  # the prefill workers' cores, while they idle

    async def subscribe(self) -> None:
        self.assembler = KVAssembler(self.engine.runner.kv_tile_shape)
        base = subject("decode", self.worker_id)
        await self.bus.subscribe(f"{base}.probe", engine_pb2.KVProbe, self._on_probe)
        await self.bus.subscribe(f"{base}.kv", engine_pb2.KVBlockChunk, self._on_chunk)
        await self.bus.subscribe(f"{base}.handoff", engine_pb2.KVHandoff, self._on_handoff)
        await self.bus.subscribe(
            subject("local_prefill", self.worker_id), engine_pb2.LocalPrefill, self._on_local
        )

    async def _on_probe(self, probe: engine_pb2.KVProbe, raw) -> None:
        num_cached = 0
        if probe.request.request_id not in self.aborted:
            num_cached = await self.driver.call(self._reserve, probe.request)
        shared = bool(probe.shm_domain) and probe.shm_domain == kv_shm.domain()
        reply = engine_pb2.KVProbeReply(num_cached_blocks=num_cached, shared_memory=shared)
        await raw.respond(reply.SerializeToString())

    def _reserve(self, spec) -> int:
        """On the engine thread: take a reference on the cached prefix of a request that is
        about to arrive, so it cannot be evicted before then."""
        request = codec.request_from_spec(spec)
        hits, _ = self.engine.kv.get_computed_blocks(request)
        self.engine.kv.pool.touch(hits)
        self._release(request.request_id)  # a second probe replaces the first
        self.reserved[request.request_id] = (hits, time.monotonic())
        return len(hits)

    def _release(self, request_id: str) -> None:
        """On the engine thread: drop a reservation that will not be used."""
        blocks, _ = self.reserved.pop(request_id, (None, 0.0))
        if blocks:
            self.engine.kv.pool.free(reversed(blocks))

    def _expire_reservations(self) -> list[str]:
        """On the engine thread: a reservation is a lease; one whose hand-off never came
        (its prefill worker died after probing) gives its blocks back."""
        now = time.monotonic()
        held = list(self.reserved.items())  # one atomic copy: the loop thread pops too
        stale = [rid for rid, (_, since) in held if now - since > RESERVE_LEASE]
        for request_id in stale:
            self._release(request_id)
        return stale

    async def tick(self) -> None:
        stale = self.assembler.expire(RESERVE_LEASE) if self.assembler is not None else []
        for request_id in stale:
            logger.warning("KV chunks of %s dropped: its hand-off never came", request_id)
        if self.reserved:
            for request_id in await self.driver.call(self._expire_reservations):
                logger.warning("reservation for %s expired: its hand-off never came", request_id)

    async def _on_chunk(self, chunk: engine_pb2.KVBlockChunk, raw) -> None:
        if chunk.request_id not in self.aborted:
            if chunk.request_id not in self.reserved:  # KV only follows a probe
                raise ValueError(f"KV for {chunk.request_id!r}, which was not probed here")
            self.assembler.add(chunk)
        await raw.respond(b"")  # the ack that paces the sender

    async def _on_handoff(self, handoff: engine_pb2.KVHandoff, raw) -> None:
        request_id = handoff.request.request_id
        probed = request_id in self.reserved
        reused, _ = self.reserved.pop(request_id, ([], 0.0))
        ack = engine_pb2.KVHandoffAck(accepted=False)
        if self._holds(request_id):
            # Sent again (re-queued by a stage that thought this worker lost): the one here
            # goes on, and its stream takes each token once; the copy is dropped.
            logger.warning("hand-off of %s: held here already, the copy dropped", request_id)
            self.assembler.drop(request_id)
            await self.driver.call(self.engine.kv.pool.free, reversed(reused))
            ack.accepted = True
            await raw.respond(ack.SerializeToString())
            return
        if request_id in self.aborted or not probed or len(reused) != handoff.num_reused_blocks:
            if request_id not in self.aborted:
                ack.error = "reserved blocks differ" if probed else "not probed here first"
                ack.place_elsewhere = True  # its reservation went (handed back, expired)
        elif handoff.HasField("kv_file"):
            try:
                kv = [kv_shm.map_tiles(handoff.kv_file, self.assembler.tile_shape)]
                kv_shm.remove(handoff.kv_file.name)  # mapped: the name is not needed
            except (OSError, ValueError) as e:
                ack.error, ack.kv_file_unreadable = f"KV file not readable here: {e}", True
            else:
                ack.accepted = True
        elif self.assembler.complete(request_id, handoff.num_chunks):
            kv = self._take_kv(request_id, handoff.num_chunks)
            ack.accepted = True
        else:
            ack.error = "KV chunks missing"
        if ack.accepted:
            error = self._check_handoff(handoff, kv, reused)
            if error is not None:
                logger.warning("hand-off of %s refused: %s", request_id, error)
                ack.accepted, ack.error = False, error
        if ack.accepted:
            self._arrive(handoff, kv, reused, raw.headers)
        else:
            self.assembler.drop(request_id)
            await self.driver.call(self.engine.kv.pool.free, reversed(reused))
            if request_id in self.aborted:
                ack = engine_pb2.KVHandoffAck(accepted=True)  # nothing to say: it is over
        self.received_ids.append(request_id)
        await raw.respond(ack.SerializeToString())

    async def _on_local(self, msg: engine_pb2.LocalPrefill, raw) -> None:
        """A request placed here to prefill itself: queued for the engine like an arrival."""
        spec = msg.request
        request_id = spec.request_id
        self.received_ids.append(request_id)
        if request_id in self.aborted or self._holds(request_id):
            return
        try:
            request = codec.request_from_spec(spec)
        except ValueError as e:
            logger.warning("request %s refused: %s", request_id, e)
            await self._refuse([((request_id, *spec.fork_ids), str(e))])
            return
        carrier = dict(spec.trace_context)
        parent = tracing.extract(carrier)
        if parent is not None:
            attributes = {"gen_ai.request.id": request_id, "tandem.worker": self.worker_id,
                          "tandem.local_prefill": True}  # fmt: skip
            self.spans[request_id] = (tracing.start_span("decode", parent, attributes), carrier)
            self.local_since[request_id] = time.time_ns()
        self.local.append(request)
        self.wake.set()

    def _holds(self, request_id: str) -> bool:
        """Whether the request is here. The deques are copied first (one atomic step): the
        engine thread takes from them meanwhile."""
        return (
            request_id in self.engine.scheduler.requests
            or any(a.request.request_id == request_id for a in list(self.arrivals))
            or any(r.request_id == request_id for r in list(self.local))
        )

    def _check_handoff(self, handoff: engine_pb2.KVHandoff, kv, reused) -> str | None:
        """Why this worker must not take a hand-off (None: it may): KV blocks that do not
        match the tokens they claim, token ids outside its vocabulary."""
        num_blocks = len(reused) + sum(part.shape[0] for part in kv)
        needed = cdiv(handoff.num_computed_tokens, self.engine.kv.block_size)
        if num_blocks != needed:
            return f"{num_blocks} KV blocks do not hold {handoff.num_computed_tokens} tokens"
        own = self.engine.runner.info.kv_cache_dtype
        if any(part.dtype != own for part in kv):
            return f"KV blocks in {kv[0].dtype}; this worker's cache is in {own}"
        if (
            is_fp8(own)
            and handoff.kv_scales
            and len(handoff.kv_scales) != len(self.engine.runner.kv_scales)
        ):
            return f"{len(handoff.kv_scales)} KV scales for {len(self.engine.runner.kv_scales)}"
        try:
            self.engine.check_request(codec.request_from_spec(handoff.request))
        except ValueError as e:
            return str(e)
        return None

    def _arrive(self, handoff: engine_pb2.KVHandoff, kv: list[torch.Tensor], reused, headers):
        """Queue a handed-off request (with its KV and reserved blocks) for the batch."""
        request_id = handoff.request.request_id
        request = codec.request_from_spec(handoff.request)
        request.num_cached_tokens = handoff.num_cached_tokens
        own = self.engine.runner.kv_scales
        if handoff.kv_scales and list(handoff.kv_scales) != own:  # stored under other scales
            kv = [requantize(part, list(handoff.kv_scales), own) for part in kv]
        num_blocks = sum(part.shape[0] for part in kv)
        self.num_kv_blocks_received += num_blocks
        self.metrics.kv_bytes_received.inc(sum(p.numel() * p.element_size() for p in kv))
        carrier = dict(headers or handoff.request.trace_context or {})
        parent = tracing.extract(carrier)
        if parent is not None:
            attributes = {
                "gen_ai.request.id": request_id,
                "tandem.worker": self.worker_id,
                "tandem.prefill_worker": handoff.prefill_worker_id,
                "tandem.kv_blocks_received": num_blocks,
                "tandem.kv_blocks_reused": len(reused),
                "tandem.kv_shared_memory": handoff.HasField("kv_file"),
            }
            span = tracing.start_span("decode", parent, attributes)
            self.spans[request_id] = (span, carrier)
        self.arrivals.append(Arrival(request, kv, handoff.num_computed_tokens, reused))
        self.wake.set()

    def trace_parent(self, request_id: str):
        span, _ = self.spans.get(request_id, (None, None))
        return None if span is None else tracing.context_of(span)

    def _take_kv(self, request_id: str, num_chunks: int) -> list[torch.Tensor]:
        if num_chunks == 0:  # every block was reused
            return []
        return self.assembler.take(request_id)

    def forget(self, request_id: str) -> None:
        self.assembler.drop(request_id)  # its arrival, if any, is dropped by _admit
        self._end_span(request_id, error="aborted")

    def _end_span(self, request_id: str, request: Request | None = None, error=None):
        """End a request's decode span; returns its trace context (None: not traced)."""
        self.local_since.pop(request_id, None)
        span, carrier = self.spans.pop(request_id, (None, None))
        if span is None:
            return None
        if request is not None:
            span.set_attribute("gen_ai.usage.completion_tokens", request.num_output_tokens)
            reason = request.status.finish_reason or "preempted"
            span.set_attribute("gen_ai.response.finish_reasons", [reason])
        tracing.end_span(span, error)
        return carrier

    async def _on_abort(self, msg: engine_pb2.AbortRequest, raw) -> None:
        await super()._on_abort(msg, raw)
        await self.driver.call(self._release, msg.request_id)

    async def drop_all(self) -> list[str]:
        dropped = await self.driver.call(self._hand_back_on_thread)  # frees every block here
        for request in dropped:
            self.forget(request.request_id)
        return [r.request_id for r in dropped]

    def num_waiting(self) -> int:
        return len(self.arrivals) + len(self.local)

    def idle(self) -> bool:
        return super().idle() and not self.arrivals and not self.local and not self.reserved

    async def hand_back(self) -> None:
        """Every request here goes back to the scheduler with its tokens (as a preemption
        does): it continues on another decode worker, its client's stream unbroken."""
        requests = await self.driver.call(self._hand_back_on_thread)
        for request in requests:
            await self._send_back(request)
        if requests:
            logger.info("handed %d request(s) back to the scheduler", len(requests))

    def _hand_back_on_thread(self) -> list[Request]:
        for request_id in list(self.reserved):
            self._release(request_id)
        arrived = []
        while self.local:  # popped one by one: the event loop may append meanwhile
            request = self.local.popleft()
            if request.request_id not in self.aborted:
                arrived.append(request)
        while self.arrivals:
            a = self.arrivals.popleft()
            self.engine.kv.pool.free(reversed(a.reused))
            if a.request.request_id not in self.aborted:
                arrived.append(a.request)
        return self.engine.hand_back() + arrived

    def heartbeat(self) -> engine_pb2.Heartbeat:
        msg = super().heartbeat()
        msg.received_request_ids.extend(dict.fromkeys(self.received_ids))  # each once
        msg.num_kv_blocks_received = self.num_kv_blocks_received
        self.received_ids.clear()
        return msg

    async def loop(self) -> None:
        while True:
            if self.arrivals or self.local:
                failed, refused = await self.driver.call(self._admit)
                if refused:
                    await self._refuse(refused)
                if failed:
                    for out in failed:
                        self._end_span(out.request.request_id, out.request, error=out.error)
                    await self.publish_tokens(failed, self.engine.num_steps)
            if self.engine.has_unfinished:
                await self._step()
            else:
                self.wake.clear()
                await self.wake.wait()
            if self.received_ids:  # tell the scheduler soon: they stop being in transit
                await self.send_heartbeat()
            await self.flush_kv_events()

    def _admit(self) -> tuple[list[StepOutput], list[tuple[tuple[str, ...], str]]]:
        """On the engine thread: move arrivals into the batch in order while they fit.
        Returns those that failed (ended with their error), and the requests to prefill
        here that this engine cannot run (ids with their forks', why). Those join the
        engine's queue at once (its scheduler admits them as blocks allow)."""
        failed, refused = [], []
        while self.local:
            request = self.local.popleft()
            if request.request_id in self.aborted:
                continue
            try:
                self.engine.add_request(request)
            except ValueError as e:
                logger.warning("request %s refused: %s", request.request_id, e)
                refused.append(((request.request_id, *request.fork_ids), str(e)))
        while self.arrivals:
            a = self.arrivals[0]
            if a.request.request_id in self.aborted:
                self.arrivals.popleft()
                self.engine.kv.pool.free(reversed(a.reused))
                continue
            try:
                if not self.engine.add_prefilled_request(
                    a.request, a.kv, a.num_computed_tokens, a.reused
                ):
                    return failed, refused
            except ValueError as e:
                logger.warning("request %s not admitted: %s", a.request.request_id, e)
                self.engine.kv.pool.free(reversed(a.reused))
                a.request.stop_reason = f"the decode worker refused it: {e}"
                a.request.status = RequestStatus.FINISHED_ABORTED
                failed.append(StepOutput(a.request, [], True, error=a.request.stop_reason))
            self.arrivals.popleft()
        return failed, refused

    async def _refuse(self, refused: list[tuple[tuple[str, ...], str]]) -> None:
        """End requests this worker cannot run (bad input the scheduler's door lets by, as a
        prefill worker's refusal would): a 400 to each one's client, its forks' too."""
        batch = engine_pb2.TokenBatch(worker_id=self.worker_id, timestamp=time.time())
        for request_ids, error in refused:
            for request_id in request_ids:
                self._end_span(request_id, error=error)
                batch.requests.add(request_id=request_id, finish_reason="abort",
                                   stop_reason=error, error_code=400)  # fmt: skip
        await self.bus.publish(subject("tokens"), batch)

    async def _step(self) -> None:
        (outputs, preempted), _, end_ns = await self.timed_step(self._step_on_thread)
        if self.local_since:
            self._trace_local_prefills(outputs, end_ns)
        if outputs:
            if self.spans:  # ended first: the client may see the last token at once
                for out in outputs:
                    if out.finished:
                        self._end_span(out.request.request_id, out.request)
            await self.publish_tokens(outputs, self.engine.num_steps)
        for request in preempted:
            logger.info("preempted %s: back to the scheduler", request.request_id)
            await self._send_back(request)

    def _trace_local_prefills(self, outputs: list[StepOutput], end_ns: int) -> None:
        """A traced request prefilled here gets its prefill span (from when it was taken to
        its first token), as a prefill worker would have recorded it."""
        for out in outputs:
            request = out.request
            since = self.local_since.pop(request.request_id, None)
            if since is None:
                continue
            _, carrier = self.spans[request.request_id]
            attributes = {
                "gen_ai.request.id": request.request_id,
                "tandem.worker": self.worker_id,
                "tandem.local_prefill": True,
                "tandem.num_tokens": request.num_prompt_tokens,
            }
            tracing.record_span("prefill", tracing.extract(carrier), since, end_ns, attributes)

    async def _send_back(self, request: Request) -> None:
        """Re-queue a request at the scheduler, with the tokens it generated here."""
        carrier = self._end_span(request.request_id, request)
        msg = engine_pb2.Preempted(
            request=codec.request_to_spec(request, trace_context=carrier),
            worker_id=self.worker_id,
        )
        await self.bus.publish(subject("scheduler", "preempted"), msg, headers=carrier)

    def join_core_loan(self, directory: str, threads: int) -> None:
        self.loan = CoreLoan(directory, torch.get_num_threads(), threads)

    def _step_on_thread(self):
        if self.loan is not None:  # torch's thread count is the engine thread's own
            threads = self.loan.threads()
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
            if threads > self.loan.own:
                self.metrics.core_loan_steps.inc()
        outputs = self.engine.step()
        return outputs, self.engine.take_preempted()
