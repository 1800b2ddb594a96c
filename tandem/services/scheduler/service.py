"""The central scheduler stage: a thin shell that turns NATS messages into calls on
ClusterScheduler and sends the plans it makes to the prefill workers."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time

from prometheus_client import CollectorRegistry

from tandem.engine.block_pool import KVEventKind, extend_block_hashes
from tandem.engine.config import SchedulingPolicy
from tandem.engine.request import prefix_salt
from tandem.services.observability import tracing
from tandem.services.observability.metrics import SchedulerMetrics
from tandem.services.observability.metrics_push import MetricsPublisher
from tandem.services.scheduler.core import (
    ClusterScheduler,
    Overloaded,
    PendingRequest,
    Plan,
    Role,
    Router,
)
from tandem.services.scheduler.prefix_index import PrefixIndex
from tandem.services.transport.bus import Bus, SubmitInbox
from tandem.services.transport.subjects import subject
from tandem.v1 import common_pb2, engine_pb2

logger = logging.getLogger(__name__)

_ROLES = {engine_pb2.WORKER_ROLE_PREFILL: Role.PREFILL, engine_pb2.WORKER_ROLE_DECODE: Role.DECODE}
EXPIRE_INTERVAL = 1.0


def _pending(spec: common_pb2.RequestSpec) -> PendingRequest:
    num_tokens = len(spec.prompt_token_ids) + len(spec.output_token_ids)
    token_ids = [*spec.prompt_token_ids, *spec.output_token_ids]
    return PendingRequest(
        spec.request_id, num_tokens, spec.priority, spec.arrival_time, spec, token_ids,
        pooling=spec.params.HasField("pooling"), lora_name=spec.lora_name,
    )  # fmt: skip


class SchedulerService:
    """Also the prefix index's writer: it applies the workers' KV events to Redis, asks a
    worker for its whole cache when its events show a gap (or Redis came back), and looks
    up each new request's cached prefix per worker for KV-aware routing."""

    def __init__(self, bus: Bus, core: ClusterScheduler, index: PrefixIndex | None) -> None:
        self.bus = bus
        self.core = core
        self.index = index
        self.next_seq: dict[str, int] = {}  # per worker: the KV event batch expected next
        self.queued: dict[str, tuple[float, object]] = {}  # id -> (since, queue span)
        self.submits = SubmitInbox(bus, "scheduler")
        self.refused: dict[str, str] = {}  # worker id -> why its heartbeats are refused
        self.registry = CollectorRegistry()
        self.metrics = SchedulerMetrics(self.registry)

    async def start(self) -> None:
        subs = [
            (subject("submit"), engine_pb2.SubmitRequest, self._on_submit),
            (subject("heartbeat"), engine_pb2.Heartbeat, self._on_heartbeat),
            (subject("scheduler", "report"), engine_pb2.StepReport, self._on_report),
            (subject("scheduler", "preempted"), engine_pb2.Preempted, self._on_preempted),
            (subject("abort"), engine_pb2.AbortRequest, self._on_abort),
            (subject("kv", "events"), engine_pb2.KVEventBatch, self._on_kv_events),
            (subject("scheduler", "drain"), engine_pb2.DrainRequest, self._on_drain),
        ]
        for subj, msg_type, handler in subs:
            await self.bus.subscribe(subj, msg_type, handler)
        await self.bus.flush()
        logger.info("scheduler ready")

    async def _on_submit(self, msg: engine_pb2.SubmitRequest, raw) -> None:
        if await self.submits.accept(msg, raw):
            await self._add(msg.request, front=False, headers=raw.headers)

    async def _on_preempted(self, msg: engine_pb2.Preempted, raw) -> None:
        self.core.abort(msg.request.request_id)  # no longer in transit anywhere
        await self._add(msg.request, front=True, headers=raw.headers)

    async def _add(self, spec: common_pb2.RequestSpec, front: bool, headers=None) -> None:
        """Queue a request. Its submission was acked already: a failure here must end it
        (a 500 through its stream), or its client would wait for it forever."""
        try:
            await self._queue(spec, front, headers)
        except Exception as e:
            logger.exception("request %s failed in the scheduler", spec.request_id)
            await self._refuse(spec, f"the scheduler failed on this request: "
                               f"{type(e).__name__}: {e}", 500)  # fmt: skip

    async def _queue(self, spec: common_pb2.RequestSpec, front: bool, headers) -> None:
        self._queued(spec, headers, requeued=front)
        request = _pending(spec)
        request.block_hashes = self._block_hashes(spec)
        request.overlap = await self._overlap(request.block_hashes)
        try:
            self.core.add_request(request, front=front)
        except ValueError as e:
            await self._refuse(spec, str(e), 400)
            return
        except Overloaded as e:
            self.metrics.refused.inc()
            await self._refuse(spec, str(e), 503)
            return
        await self._send_plans()

    async def _refuse(self, spec: common_pb2.RequestSpec, error: str, code: int) -> None:
        """End a request here: the gateway answers `code` (400: it can never run; 503: not
        now) for it and its forks, through the tokenizer that holds their streams. Then
        every stage that opened the request forgets it."""
        self._dequeued(spec.request_id, error=error)
        request_ids = (spec.request_id, *spec.fork_ids)
        batch = engine_pb2.TokenBatch(worker_id="scheduler", timestamp=time.time())
        for request_id in request_ids:
            batch.requests.add(request_id=request_id, finish_reason="abort",
                               stop_reason=error, error_code=code)  # fmt: skip
        await self.bus.publish(subject("tokens"), batch)
        for request_id in request_ids:  # after the error: one publisher's order is kept
            abort = engine_pb2.AbortRequest(request_id=request_id, reason="error")
            await self.bus.publish(subject("abort"), abort)

    async def _on_heartbeat(self, hb: engine_pb2.Heartbeat, raw) -> None:
        self._heartbeat(hb)
        await self._send_plans()

    def _heartbeat(self, hb: engine_pb2.Heartbeat) -> None:
        role = _ROLES.get(hb.role)
        if role is None:
            return
        refused = self.core.on_heartbeat(
            hb.worker_id,
            role,
            received_ids=hb.received_request_ids,
            num_blocks=hb.num_blocks,
            num_free_blocks=hb.num_free_blocks,
            num_running=hb.num_running,
            num_waiting=hb.num_waiting,
            block_size=hb.block_size,
            max_num_seqs=hb.max_num_seqs,
            max_model_len=hb.max_model_len,
            max_num_batched_tokens=hb.max_num_batched_tokens,
            vocab_size=hb.vocab_size,
            kv_cache_dtype=hb.kv_cache_dtype,
            draining=hb.draining,
            lora_adapters=frozenset(hb.lora_adapters),
        )
        if refused and self.refused.get(hb.worker_id) != refused:  # said once, not per beat
            logger.error("%s", refused)
        if refused:
            if len(self.refused) > 1024:
                self.refused.clear()
            self.refused[hb.worker_id] = refused
        else:
            self.refused.pop(hb.worker_id, None)

    async def _on_report(self, report: engine_pb2.StepReport, raw) -> None:
        if report.HasField("heartbeat"):
            self._heartbeat(report.heartbeat)
        errors = {r.request_id: r.error for r in report.refused}
        given_up = self.core.on_report(
            report.worker_id,
            prefilled_ids=report.prefilled_request_ids,
            finished_ids=report.finished_request_ids,
            failed_ids=report.failed_request_ids,
            refused_ids=list(errors),
            step_id=report.step_id,
            local=report.local,
        )
        for request in given_up:
            error = errors[request.request_id]
            logger.warning("request %s refused twice, ended: %s", request.request_id, error)
            await self._refuse(request.payload, error, 400)
        for request_id, error in errors.items():
            if request_id not in {r.request_id for r in given_up}:
                logger.warning("%s refused %s (%s): placed again", report.worker_id,
                               request_id, error)  # fmt: skip
        await self._send_plans()

    async def _on_drain(self, msg: engine_pb2.DrainRequest, raw) -> None:
        """A worker leaving: first it asks to be placed nothing more (and how much placed
        work is still on its way to it), at last it says it is gone."""
        if msg.done:
            known = self.core.remove_worker(msg.worker_id)
            if known:
                logger.info("worker %s drained and left", msg.worker_id)
                await self._forget_worker(msg.worker_id)
            reply = engine_pb2.DrainReply(known=known)
        else:
            pending = self.core.drain(msg.worker_id)
            reply = engine_pb2.DrainReply(known=pending is not None, num_pending=pending or 0)
        await raw.respond(reply.SerializeToString())
        await self._send_plans()  # a departed prefill worker's requests go elsewhere

    async def _forget_worker(self, worker_id: str) -> None:
        self.next_seq.pop(worker_id, None)
        if self.index is not None:
            await self.index.drop_worker(worker_id)

    async def _on_abort(self, msg: engine_pb2.AbortRequest, raw) -> None:
        self.core.abort(msg.request_id)
        self._dequeued(msg.request_id, error=f"aborted ({msg.reason})")

    def _queued(self, spec: common_pb2.RequestSpec, headers, requeued: bool) -> None:
        """A request enters the queue: its clock starts (and its queue span, when tracing).
        The spec carries its trace context on, inside the plans made for it."""
        span = None
        if tracing.enabled():
            parent = tracing.extract(headers, spec.trace_context)
            if parent is not None and not spec.trace_context:
                spec.trace_context.update(headers)
            attributes = {"gen_ai.request.id": spec.request_id, "tandem.requeued": requeued}
            span = tracing.start_span("queue", parent, attributes)
        self.queued[spec.request_id] = (time.monotonic(), span)

    def _dequeued(
        self, request_id: str, placed: PendingRequest | None = None, error: str | None = None
    ) -> None:
        """A request leaves the queue: placed (its first chunk planned) or gone."""
        entry = self.queued.pop(request_id, None)
        if entry is None:
            return
        start, span = entry
        waited = time.monotonic() - start
        if error is None:
            self.metrics.queue_time.observe(waited)
        if span is not None:
            span.set_attribute("gen_ai.latency.time_in_queue", waited)
            if placed is not None:
                span.set_attribute("tandem.prefill_worker", placed.prefill_worker_id)
                span.set_attribute("tandem.decode_worker", placed.decode_worker_id)
            tracing.end_span(span, error)

    def _block_hashes(self, spec: common_pb2.RequestSpec) -> list[int]:
        """The request's full blocks' chained hashes, as the workers compute them."""
        block_size = next((w.block_size for w in self.core.workers.values()), 0)
        if not block_size or self.core.router is not Router.KV_AWARE:
            return []
        hashes: list[int] = []
        tokens = [*spec.prompt_token_ids, *spec.output_token_ids]
        salt = prefix_salt(spec.cache_salt or None, spec.lora_name or None)  # as the workers
        extend_block_hashes(hashes, tokens, block_size, salt)
        return hashes

    async def _overlap(self, block_hashes: list[int]) -> dict[str, int]:
        """Per worker, how many leading blocks of this request it holds (from the index)."""
        if self.index is None or not block_hashes:
            return {}
        start = time.perf_counter()
        overlap = await self.index.lookup(block_hashes)
        if self.index.available:
            self.metrics.index_lookup.observe(time.perf_counter() - start)
        return overlap

    async def _on_kv_events(self, batch: engine_pb2.KVEventBatch, raw) -> None:
        if self.index is None:
            return
        expected = self.next_seq.get(batch.worker_id)
        if not batch.full_resync and batch.seq != expected:
            await self._resync(batch.worker_id)  # a gap, or a worker new to this index
            return
        self.next_seq[batch.worker_id] = batch.seq + 1
        await self.index.apply(batch.worker_id, _events(batch), full_resync=batch.full_resync)

    async def _resync(self, worker_id: str) -> None:
        self.next_seq.pop(worker_id, None)
        msg = engine_pb2.KVResyncRequest(worker_id=worker_id)
        await self.bus.publish(subject("kv", "resync", worker_id), msg)

    async def _send_plans(self) -> None:
        for plan in self.core.schedule():
            await self.bus.publish(subject("prefill", plan.worker_id, "plan"), _plan_proto(plan))
            for chunk in plan.chunks:
                if chunk.is_first:
                    self._dequeued(chunk.request.request_id, chunk.request)
        for request in self.core.take_local():  # their decode worker prefills them
            msg = engine_pb2.LocalPrefill(request=request.payload)
            await self.bus.publish(subject("local_prefill", request.decode_worker_id), msg)
            self.metrics.local_prefills.inc()
            self._dequeued(request.request_id, request)

    async def run(self) -> None:
        """Expire silent workers now and then, and rebuild the index when Redis returns;
        everything else happens on messages."""
        while True:
            await asyncio.sleep(EXPIRE_INTERVAL)
            for worker_id in self.core.expire():
                logger.warning("worker %s stopped sending heartbeats: dropped", worker_id)
                await self._forget_worker(worker_id)
                lost = engine_pb2.WorkerLost(
                    worker_id=worker_id, request_ids=self.core.lost_handed.pop(worker_id, [])
                )
                await self.bus.publish(subject("worker", "lost"), lost)
            for request in self.core.stranded():
                await self._refuse(request.payload, "no worker is left to run it", 503)
            if self.index is not None and not self.index.available and await self.index.ping():
                for worker_id in list(self.core.workers):
                    await self._resync(worker_id)
            await self._send_plans()
            await self.bus.publish(subject("scheduler", "stats"), self._stats())
            self._update_gauges()

    def _update_gauges(self) -> None:
        core, m = self.core, self.metrics
        m.queue_depth.set(len(core.waiting))
        m.waiting_tokens.set(sum(r.num_tokens for r in core.waiting))
        m.prefilling.set(len(core.prefilling))
        for role in Role:
            m.workers.labels(role=role.value).set(
                sum(w.role is role for w in core.workers.values())
            )
        if self.index is not None:
            m.index_available.set(1 if self.index.available else 0)

    def _stats(self) -> engine_pb2.SchedulerStats:
        core = self.core
        msg = engine_pb2.SchedulerStats(
            num_waiting=len(core.waiting),
            num_prefilling=len(core.prefilling),
            num_waiting_tokens=sum(r.num_tokens for r in core.waiting),
        )
        if self.index is not None:
            msg.index_available = self.index.available
            msg.num_index_lookups = self.index.num_lookups
            if self.index.lookup_seconds:
                msg.index_lookup_p50_ms = 1000 * statistics.median(self.index.lookup_seconds)
        return msg


def _events(batch: engine_pb2.KVEventBatch) -> list[tuple[KVEventKind, int]]:
    out: list[tuple[KVEventKind, int]] = []
    for event in batch.events:
        kind = event.WhichOneof("event")
        if kind == "stored":
            out += [(KVEventKind.STORED, h) for h in event.stored.block_hashes]
        elif kind == "removed":
            out += [(KVEventKind.REMOVED, h) for h in event.removed.block_hashes]
        elif kind == "cleared":
            out.append((KVEventKind.CLEARED, 0))
    return out


def _plan_proto(plan: Plan) -> engine_pb2.StepPlan:
    msg = engine_pb2.StepPlan(worker_id=plan.worker_id, step_id=plan.step_id)
    for chunk in plan.chunks:
        entry = msg.chunks.add(
            request_id=chunk.request.request_id,
            num_tokens=chunk.num_tokens,
            decode_worker_id=chunk.request.decode_worker_id,
        )
        if chunk.is_first:
            entry.request.CopyFrom(chunk.request.payload)
    return msg


async def serve(
    nats_url: str,
    redis_url: str | None,
    policy: SchedulingPolicy,
    worker_timeout: float,
    router: Router = Router.KV_AWARE,
    overlap_weight: float = 1.0,
    health_port: int | None = None,
    max_queued_requests: int | None = None,
    max_queued_tokens: int | None = None,
    no_worker_timeout: float = 30.0,
    max_local_prefill_length: int = 0,
) -> None:
    """Run the scheduler until cancelled (the `tandem scheduler` entry point); `/health` on
    `health_port` when given."""
    from tandem.services.observability.health import HealthServer

    bus = await Bus.connect(nats_url, "scheduler")
    core = ClusterScheduler(
        policy,
        worker_timeout=worker_timeout,
        router=router,
        overlap_weight=overlap_weight,
        max_queued_requests=max_queued_requests,
        max_queued_tokens=max_queued_tokens,
        no_worker_timeout=no_worker_timeout,
        max_local_prefill_length=max_local_prefill_length,
    )
    index = PrefixIndex(redis_url) if redis_url else None
    service = SchedulerService(bus, core, index)
    await service.start()
    publisher = MetricsPublisher(bus, service.registry, "scheduler", "scheduler")
    publisher.start()
    health = HealthServer(health_port, registry=service.registry) if health_port else None
    if health is not None:
        await health.start()
        health.up = True
    try:
        await service.run()
    finally:
        if health is not None:
            await health.stop()
        publisher.stop()
        await bus.close()
        if index is not None:
            await index.close()
