"""The central scheduler stage: a thin shell that turns NATS messages into calls on
ClusterScheduler and sends the plans it makes to the prefill workers."""

from __future__ import annotations

import asyncio
import logging

from tandem.engine.config import SchedulingPolicy
from tandem.services.common.bus import Bus, subject
from tandem.services.scheduler.core import ClusterScheduler, PendingRequest, Plan, Role
from tandem.v1 import common_pb2, engine_pb2

logger = logging.getLogger(__name__)

_ROLES = {engine_pb2.WORKER_ROLE_PREFILL: Role.PREFILL, engine_pb2.WORKER_ROLE_DECODE: Role.DECODE}
EXPIRE_INTERVAL = 1.0


def _pending(spec: common_pb2.RequestSpec) -> PendingRequest:
    num_tokens = len(spec.prompt_token_ids) + len(spec.output_token_ids)
    return PendingRequest(spec.request_id, num_tokens, spec.priority, spec.arrival_time, spec)


class SchedulerService:
    def __init__(self, bus: Bus, core: ClusterScheduler) -> None:
        self.bus = bus
        self.core = core

    async def start(self) -> None:
        subs = [
            (subject("submit"), engine_pb2.SubmitRequest, self._on_submit),
            (subject("heartbeat"), engine_pb2.Heartbeat, self._on_heartbeat),
            (subject("scheduler", "report"), engine_pb2.StepReport, self._on_report),
            (subject("scheduler", "preempted"), engine_pb2.Preempted, self._on_preempted),
            (subject("abort"), engine_pb2.AbortRequest, self._on_abort),
        ]
        for subj, msg_type, handler in subs:
            await self.bus.subscribe(subj, msg_type, handler)
        await self.bus.flush()
        logger.info("scheduler ready")

    async def _on_submit(self, msg: engine_pb2.SubmitRequest, raw) -> None:
        await self._add(msg.request, front=False)

    async def _on_preempted(self, msg: engine_pb2.Preempted, raw) -> None:
        self.core.abort(msg.request.request_id)  # no longer in transit anywhere
        await self._add(msg.request, front=True)

    async def _add(self, spec: common_pb2.RequestSpec, front: bool) -> None:
        try:
            self.core.add_request(_pending(spec), front=front)
        except ValueError as e:
            delta = engine_pb2.TextDelta(request_id=spec.request_id, error=str(e), error_code=400)
            await self.bus.publish(spec.reply_subject, delta)
            return
        await self._send_plans()

    async def _on_heartbeat(self, hb: engine_pb2.Heartbeat, raw) -> None:
        self._heartbeat(hb)
        await self._send_plans()

    def _heartbeat(self, hb: engine_pb2.Heartbeat) -> None:
        role = _ROLES.get(hb.role)
        if role is None:
            return
        self.core.on_heartbeat(
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
        )

    async def _on_report(self, report: engine_pb2.StepReport, raw) -> None:
        if report.HasField("heartbeat"):
            self._heartbeat(report.heartbeat)
        self.core.on_report(
            report.worker_id,
            prefilled_ids=report.prefilled_request_ids,
            finished_ids=report.finished_request_ids,
            failed_ids=report.failed_request_ids,
        )
        await self._send_plans()

    async def _on_abort(self, msg: engine_pb2.AbortRequest, raw) -> None:
        self.core.abort(msg.request_id)

    async def _send_plans(self) -> None:
        for plan in self.core.schedule():
            await self.bus.publish(subject("prefill", plan.worker_id, "plan"), _plan_proto(plan))

    async def run(self) -> None:
        """Expire silent workers now and then; everything else happens on messages."""
        while True:
            await asyncio.sleep(EXPIRE_INTERVAL)
            for worker_id in self.core.expire():
                logger.warning("worker %s stopped sending heartbeats: dropped", worker_id)
            await self._send_plans()


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


async def serve(nats_url: str, policy: SchedulingPolicy, worker_timeout: float) -> None:
    """Run the scheduler until cancelled (the `tandem scheduler` entry point)."""
    bus = await Bus.connect(nats_url, "scheduler")
    service = SchedulerService(bus, ClusterScheduler(policy, worker_timeout=worker_timeout))
    await service.start()
    try:
        await service.run()
    finally:
        await bus.close()
