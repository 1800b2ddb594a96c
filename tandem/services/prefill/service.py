"""The prefill worker: runs the central scheduler's token-budget plans with the engine,
streams each request's first token at once, and hands the request with its KV blocks to its
decode worker: over NATS, or through shared memory when that worker is on this machine. Its
blocks then stay here only as prefix cache."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, replace

import torch
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from tandem.engine.config import EngineConfig
from tandem.engine.kv_quant import is_fp8
from tandem.engine.request import Request
from tandem.services.observability import tracing
from tandem.services.transport import codec, kv_shm
from tandem.services.transport.bus import Bus
from tandem.services.transport.kv_transfer import send_kv
from tandem.services.transport.subjects import subject
from tandem.services.worker.core_loan import BusyMark
from tandem.services.worker.shell import WorkerShell
from tandem.v1 import engine_pb2

logger = logging.getLogger(__name__)
TRANSFERS_PER_DECODE = 2
# Seconds a hand-off waits for each reply from its decode worker: replies lost (NATS restarted,
# the worker died) must not hold a lane for long.
HANDOFF_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Transfer:
    """How one hand-off went: the decode worker's answer and what crossed to it."""

    ack: engine_pb2.KVHandoffAck
    num_blocks: int
    num_reused: int
    num_bytes: int
    shared_memory: bool


class PrefillWorker(WorkerShell):
    """Runs the plans sent to it, in order; hands each prefilled request to its decode
    worker, sending only the KV blocks that worker does not hold yet."""

    role = engine_pb2.WORKER_ROLE_PREFILL

    def __init__(self, config: EngineConfig, bus: Bus, worker_id: str) -> None:
        # Decode workers speculate; a prefill worker's plans end at a request's first token,
        # so it loads no draft model and proposes nothing (the flag is the cluster's).
        super().__init__(replace(config, speculative=None), bus, worker_id)
        self.plans: asyncio.Queue[engine_pb2.StepPlan] = asyncio.Queue()
        self.decode_of: dict[str, str] = {}  # request id -> its decode worker
        self.trace_of: dict[str, dict[str, str]] = {}  # request id -> W3C context, traced
        self.transfers: dict[str, asyncio.Task] = {}  # request id -> its hand-off
        self.busy = False  # a plan is running
        self.busy_mark: BusyMark | None = None  # says so to a decode worker borrowing cores
        self.last_step_id = 0  # of the newest plan received
        self.lanes: dict[str, asyncio.Semaphore] = {}  # decode worker id -> its KV lane
        self.no_shared_memory: set[str] = set()  # decode workers that could not map a file
        self.num_kv_transfers = 0
        self.num_kv_file_transfers = 0  # of those, through shared memory
        self.kv_transfer_seconds = 0.0
        self.kv_transfer_bytes = 0
        # request id -> step id of the plan it stopped short in: its grammar was compiling
        self.deferred: dict[str, int] = {}

    def grammar_ready(self, request_id: str, start_ns: int, end_ns: int, hit: bool, error):
        """A request that stopped short of its last token for its grammar gets a step of
        its own (an error ends it in that step)."""
        super().grammar_ready(request_id, start_ns, end_ns, hit, error)
        self._resume(request_id)

    def trace_parent(self, request_id: str):
        carrier = self.trace_of.get(request_id)
        return None if carrier is None else tracing.extract(carrier)

    def _resume(self, request_id: str) -> None:
        step_id = self.deferred.pop(request_id, None)
        if step_id is not None and request_id not in self.aborted:
            chunk = engine_pb2.ScheduledChunk(request_id=request_id, num_tokens=1 << 30)
            plan = engine_pb2.StepPlan(worker_id=self.worker_id, step_id=step_id, local=True)
            plan.chunks.append(chunk)
            self.plans.put_nowait(plan)

    async def subscribe(self) -> None:
        await self.bus.subscribe(
            subject("prefill", self.worker_id, "plan"), engine_pb2.StepPlan, self._on_plan
        )

    def heartbeat(self) -> engine_pb2.Heartbeat:
        msg = super().heartbeat()
        msg.num_kv_transfers = self.num_kv_transfers
        msg.num_kv_file_transfers = self.num_kv_file_transfers
        msg.kv_transfer_seconds = self.kv_transfer_seconds
        msg.kv_transfer_bytes = self.kv_transfer_bytes
        return msg

    def idle(self) -> bool:
        return super().idle() and self.plans.empty() and not self.transfers and not self.busy

    def num_waiting(self) -> int:
        """Plans received and not yet run (the one running included)."""
        return self.plans.qsize() + self.busy

    async def hand_back(self) -> None:
        """Requests placed here and not prefilled go back to the queue when the scheduler
        hears this worker is gone; the hand-offs under way are finished first (each is
        bounded by its own timeouts), since their requests are no longer queued anywhere."""
        if self.transfers:
            await asyncio.wait(list(self.transfers.values()), timeout=60.0)

    async def _on_plan(self, plan: engine_pb2.StepPlan, raw) -> None:
        self.last_step_id = max(self.last_step_id, plan.step_id)
        self.plans.put_nowait(plan)

    async def drop_all(self) -> list[str]:
        """The plans not run yet and the requests in the engine are reported failed: the
        scheduler places again those it has not placed again already (a request with its
        first token is the tokenizer's to re-queue)."""
        reports = []
        while not self.plans.empty():
            plan = self.plans.get_nowait()
            ids = list(dict.fromkeys(c.request_id for c in plan.chunks))
            reports.append(engine_pb2.StepReport(
                worker_id=self.worker_id, step_id=plan.step_id, failed_request_ids=ids
            ))  # fmt: skip
        handing_off = list(self.transfers)  # prefilled: their first token is out
        for request_id in handing_off:
            self.forget(request_id)
        dropped = await super().drop_all()
        if dropped:
            reports.append(engine_pb2.StepReport(
                worker_id=self.worker_id, step_id=self.last_step_id, failed_request_ids=dropped
            ))  # fmt: skip
        for report in reports:
            await self.bus.publish(subject("scheduler", "report"), report)
        return dropped + [r for r in handing_off if r not in dropped]

    def forget(self, request_id: str) -> None:
        self.decode_of.pop(request_id, None)
        self.deferred.pop(request_id, None)
        self.trace_of.pop(request_id, None)
        transfer = self.transfers.get(request_id)
        if transfer is not None:  # aborted while its KV moves: its lane is free at once
            transfer.cancel()

    def join_core_loan(self, directory: str, threads: int) -> None:
        self.busy_mark = BusyMark(directory, self.worker_id)

    async def loop(self) -> None:
        while True:
            plan = await self.plans.get()
            self.busy = True
            if self.busy_mark is not None:  # before the step: the decode worker gives back
                self.busy_mark.set(True)
            try:
                await self._run_plan(plan)
            finally:
                self.busy = False
                if self.busy_mark is not None and self.plans.empty():
                    self.busy_mark.set(False)

    async def _run_plan(self, plan: engine_pb2.StepPlan) -> None:
        report = engine_pb2.StepReport(
            worker_id=self.worker_id, step_id=plan.step_id, local=plan.local
        )
        budget: dict[str, int] = {}
        new: list[Request] = []
        for chunk in plan.chunks:
            if chunk.request_id in self.aborted:
                continue
            if chunk.HasField("request"):
                try:
                    new.append(codec.request_from_spec(chunk.request))
                except ValueError as e:
                    logger.warning("request %s refused: %s", chunk.request_id, e)
                    report.refused.add(request_id=chunk.request_id, error=str(e))
                    continue
                self.decode_of[chunk.request_id] = chunk.decode_worker_id
                if chunk.request.trace_context and tracing.enabled():
                    self.trace_of[chunk.request_id] = dict(chunk.request.trace_context)
            budget[chunk.request_id] = chunk.num_tokens
        planned = dict(budget)
        (outputs, failed, refused, handoffs, deferred), start_ns, end_ns = await self.timed_step(
            self._step, new, budget
        )
        for request_id, compile_done in deferred:
            self.deferred[request_id] = plan.step_id
            if compile_done.done():  # compiled since: its callback may have come already
                self._resume(request_id)
        report.failed_request_ids.extend(failed)
        for request_id, error in refused.items():
            report.refused.add(request_id=request_id, error=error)
        for request_id in (*failed, *refused):
            self.forget(request_id)
        if self.trace_of:
            self._trace_step(plan.step_id, planned, {*failed, *refused}, start_ns, end_ns)
        if outputs:
            await self.publish_tokens(outputs, plan.step_id)  # the first tokens: TTFT
        for out in outputs:  # forks made this step go where their parent goes
            parent = out.request.parent_id
            if parent in self.decode_of and out.request.num_output_tokens == 1:
                self.decode_of[out.request.request_id] = self.decode_of[parent]
                if parent in self.trace_of:
                    self.trace_of[out.request.request_id] = self.trace_of[parent]
        for out in outputs:
            if out.finished:
                report.finished_request_ids.append(out.request.request_id)
                self.forget(out.request.request_id)
        for request, kv in handoffs:
            report.prefilled_request_ids.append(request.request_id)
            task = self.transfers[request.request_id] = asyncio.create_task(
                self._hand_off(request, kv)
            )
            task.add_done_callback(functools.partial(self._transfer_done, request.request_id))
        report.heartbeat.CopyFrom(self.heartbeat())
        await self.bus.publish(subject("scheduler", "report"), report)
        await self.flush_kv_events()

    def _transfer_done(self, request_id: str, task: asyncio.Task) -> None:
        if self.transfers.get(request_id) is task:  # not a later hand-off of the same id
            del self.transfers[request_id]

    def _trace_step(
        self, step_id: int, planned: dict[str, int], failed: set[str], start_ns, end_ns
    ) -> None:
        """Each traced request's share of the step: one span each."""
        batch_tokens = sum(planned.values())
        for request_id, num_tokens in planned.items():
            carrier = self.trace_of.get(request_id)
            if carrier is None or request_id in failed:
                continue
            attributes = {
                "gen_ai.request.id": request_id,
                "tandem.worker": self.worker_id,
                "tandem.step_id": step_id,
                "tandem.num_tokens": num_tokens,
                "tandem.batch_tokens": batch_tokens,
            }
            tracing.record_span("prefill", tracing.extract(carrier), start_ns, end_ns, attributes)

    def _step(self, new: list[Request], budget: dict[str, int]):
        """On the engine thread: add the plan's new requests, run it, and take each request
        whose prompt is done out of the engine with its KV. Returns the step's outputs, the
        ids of requests that did not fit (no blocks: placed again), those refused (request
        id -> why: tried once more, then ended) and the hand-offs."""
        refused: dict[str, str] = {}
        for request in new:
            if request.request_id in self.engine.scheduler.requests:  # a plan sent twice
                logger.warning("request %s planned here again: the one here goes on",
                               request.request_id)  # fmt: skip
                continue
            try:
                self.engine.add_request(request)
            except ValueError as e:
                logger.warning("request %s refused: %s", request.request_id, e)
                refused[request.request_id] = str(e)
                budget.pop(request.request_id, None)
        outputs, not_fitting, short = self.engine.step_plan(budget)
        handoffs = [self.engine.hand_off(o.request.request_id) for o in outputs if not o.finished]
        requests = self.engine.scheduler.requests
        deferred = [(rid, requests[rid].grammar.future) for rid in short]
        return outputs, not_fitting, refused, handoffs, deferred

    async def _hand_off(self, request: Request, kv: torch.Tensor) -> None:
        """Send the KV the decode worker lacks, then the request itself, to its decode worker."""
        request_id = request.request_id
        decode_id = self.decode_of.pop(request_id, None)
        carrier = self.trace_of.pop(request_id, None)
        if decode_id is None or request_id in self.aborted:
            return
        spec = codec.request_to_spec(request, trace_context=carrier)
        span = None
        if carrier is not None:
            attributes = {"gen_ai.request.id": request_id, "tandem.decode_worker": decode_id}
            span = tracing.start_span("kv_transfer", tracing.extract(carrier), attributes)
        start = time.perf_counter()
        error = None
        try:
            sent = await self._transfer(request, spec, decode_id, kv, carrier)
            if sent is not None and sent.ack.kv_file_unreadable:  # the probe said it could
                logger.warning("%s: %s; KV goes over NATS from now on", decode_id, sent.ack.error)
                self.no_shared_memory.add(decode_id)
                sent = await self._transfer(request, spec, decode_id, kv, carrier)
            if sent is None:  # aborted meanwhile
                return
            if not sent.ack.accepted and sent.ack.place_elsewhere:
                logger.warning("%s: %s; %s placed again", decode_id, sent.ack.error, request_id)
                await self._place_again(spec, carrier)
                return
            if not sent.ack.accepted:
                raise RuntimeError(sent.ack.error)
            elapsed = time.perf_counter() - start
            self.metrics.kv_bytes_sent.inc(sent.num_bytes)
            self.metrics.kv_blocks_reused.inc(sent.num_reused)
            self.metrics.kv_transfer_seconds.observe(elapsed)
            self.num_kv_transfers += 1
            self.num_kv_file_transfers += sent.shared_memory
            self.kv_transfer_seconds += elapsed
            self.kv_transfer_bytes += sent.num_bytes
            if span is not None:
                span.set_attribute("tandem.kv_blocks_sent", sent.num_blocks)
                span.set_attribute("tandem.kv_blocks_reused", sent.num_reused)
                span.set_attribute("tandem.kv_bytes", sent.num_bytes)
                span.set_attribute("tandem.kv_shared_memory", sent.shared_memory)
        except NoRespondersError:  # the decode worker left, or stopped answering mid-hand-off:
            # it does not run the request, so it is queued again (a worker that was only slow
            # and took it after all decodes it twice; the stream takes each position once)
            logger.warning("%s gone: %s goes back to the scheduler", decode_id, request_id)
            await self._place_again(spec, carrier)
        except Exception as e:
            logger.error("hand-off of %s to %s failed: %s", request_id, decode_id, e)
            error = f"hand-off to decode worker failed: {e}"
            await self._fail(request, error)
        finally:
            if span is not None:
                tracing.end_span(span, error)

    async def _place_again(self, spec, carrier) -> None:
        """Send a request back to the scheduler, to be placed on another decode worker."""
        msg = engine_pb2.Preempted(request=spec, worker_id=self.worker_id)
        await self.bus.publish(subject("scheduler", "preempted"), msg, headers=carrier)

    async def _transfer(
        self, request: Request, spec, decode_id: str, kv: torch.Tensor, carrier
    ) -> Transfer | None:
        """One try at a hand-off: probe which leading blocks the decode worker holds, send
        the rest (as a file in shared memory when it sees this machine's, else in chunks over
        NATS), then the request. None when the request was aborted while it waited."""
        kv_file = None
        try:
            async with self._lane(decode_id):
                if request.request_id in self.aborted:  # while it waited for the lane
                    return None
                domain = "" if decode_id in self.no_shared_memory else kv_shm.domain()
                probe = await self.bus.request(
                    subject("decode", decode_id, "probe"),
                    engine_pb2.KVProbe(request=spec, shm_domain=domain),
                    engine_pb2.KVProbeReply,
                    timeout=HANDOFF_TIMEOUT,
                )
                num_reused = probe.num_cached_blocks  # the decode worker holds these already
                sent = kv[num_reused:]
                num_chunks = 0
                if probe.shared_memory and sent.shape[0]:
                    kv_file = self._write_file(request.request_id, sent)
                if kv_file is None:
                    num_chunks = await send_kv(
                        self.bus,
                        subject("decode", decode_id, "kv"),
                        request.request_id,
                        sent,
                        timeout=HANDOFF_TIMEOUT,
                    )
            handoff = engine_pb2.KVHandoff(
                request=spec,
                num_computed_tokens=request.num_computed_tokens,
                num_chunks=num_chunks,
                num_cached_tokens=max(request.num_cached_tokens, 0),
                prefill_worker_id=self.worker_id,
                num_reused_blocks=num_reused,
                kv_scales=self.engine.runner.kv_scales if is_fp8(kv.dtype) else (),
            )
            if kv_file is not None:
                handoff.kv_file.CopyFrom(kv_file)
            ack = await self.bus.request(
                subject("decode", decode_id, "handoff"),
                handoff,
                engine_pb2.KVHandoffAck,
                timeout=HANDOFF_TIMEOUT,
                headers=carrier,
            )
        except NatsTimeout:  # the decode worker stopped answering (killed before NATS noticed)
            raise NoRespondersError() from None
        finally:
            if kv_file is not None:  # mapped by now, or never will be
                kv_shm.remove(kv_file.name)
        num_bytes = sent.numel() * sent.element_size()
        return Transfer(ack, sent.shape[0], num_reused, num_bytes, kv_file is not None)

    def _write_file(self, request_id: str, kv: torch.Tensor) -> engine_pb2.KVFile | None:
        """The tiles in a shared-memory file; None when it does not fit (a small /dev/shm,
        as a container's 64 MiB default): they go over NATS then."""
        try:
            return kv_shm.write(kv)
        except OSError as e:
            logger.warning("KV of %s over NATS: no room in shared memory (%s)", request_id, e)
            return None

    def _lane(self, decode_id: str) -> asyncio.Semaphore:
        """At most TRANSFERS_PER_DECODE hand-offs to one decode worker send KV at once, each
        with at most send_kv's window of chunks unacknowledged: what NATS buffers for a busy
        decode worker stays far under the server's per-client limit (64 MiB), past which it
        would cut that worker off as a slow consumer."""
        lane = self.lanes.get(decode_id)
        if lane is None:
            lane = self.lanes[decode_id] = asyncio.Semaphore(TRANSFERS_PER_DECODE)
        return lane

    async def _fail(self, request: Request, error: str) -> None:
        """End a request that cannot go on, telling the client (through the tokenizer)."""
        tokens = engine_pb2.RequestTokens(
            request_id=request.request_id, finish_reason="abort", stop_reason=error
        )
        await self.bus.publish(
            subject("tokens"), engine_pb2.TokenBatch(worker_id=self.worker_id, requests=[tokens])
        )

    async def shutdown(self) -> None:
        for task in list(self.transfers.values()):
            task.cancel()
        await super().shutdown()
