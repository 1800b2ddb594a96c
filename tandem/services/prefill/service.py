"""The prefill worker: runs the central scheduler's token-budget plans with the engine,
streams each request's first token at once, and hands the request with its KV blocks to its
decode worker over NATS. Its blocks then stay here only as prefix cache."""

from __future__ import annotations

import asyncio
import logging

import torch

from tandem.engine.config import EngineConfig
from tandem.engine.core import StepOutput
from tandem.engine.request import Request
from tandem.services.common import codec
from tandem.services.common.bus import Bus, send_kv, subject
from tandem.services.common.worker import WorkerShell, request_tokens
from tandem.v1 import engine_pb2

logger = logging.getLogger(__name__)


class PrefillWorker(WorkerShell):
    """Runs the plans sent to it, in order; hands each prefilled request to its decode
    worker, sending only the KV blocks that worker does not hold yet."""

    role = engine_pb2.WORKER_ROLE_PREFILL

    def __init__(self, config: EngineConfig, bus: Bus, worker_id: str) -> None:
        super().__init__(config, bus, worker_id)
        self.plans: asyncio.Queue[engine_pb2.StepPlan] = asyncio.Queue()
        self.decode_of: dict[str, str] = {}  # request id -> its decode worker
        self.transfers: set[asyncio.Task] = set()

    async def subscribe(self) -> None:
        await self.bus.subscribe(
            subject("prefill", self.worker_id, "plan"), engine_pb2.StepPlan, self._on_plan
        )

    async def _on_plan(self, plan: engine_pb2.StepPlan, raw) -> None:
        self.plans.put_nowait(plan)

    def forget(self, request_id: str) -> None:
        self.decode_of.pop(request_id, None)

    async def loop(self) -> None:
        while True:
            await self._run_plan(await self.plans.get())

    async def _run_plan(self, plan: engine_pb2.StepPlan) -> None:
        report = engine_pb2.StepReport(worker_id=self.worker_id, step_id=plan.step_id)
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
                    report.finished_request_ids.append(chunk.request_id)
                    continue
                self.decode_of[chunk.request_id] = chunk.decode_worker_id
            budget[chunk.request_id] = chunk.num_tokens
        outputs, failed, handoffs = await self.thread.call(self._step, new, budget)
        report.failed_request_ids.extend(failed)
        for request_id in failed:
            self.decode_of.pop(request_id, None)
        if outputs:
            batch = engine_pb2.TokenBatch(worker_id=self.worker_id, step_id=plan.step_id)
            batch.requests.extend(request_tokens(o) for o in outputs)
            await self.bus.publish(subject("tokens"), batch)  # the first tokens: TTFT
        for out in outputs:
            if out.finished:
                report.finished_request_ids.append(out.request.request_id)
                self.decode_of.pop(out.request.request_id, None)
        for request, kv in handoffs:
            report.prefilled_request_ids.append(request.request_id)
            task = asyncio.create_task(self._hand_off(request, kv))
            self.transfers.add(task)
            task.add_done_callback(self.transfers.discard)
        report.heartbeat.CopyFrom(self.heartbeat())
        await self.bus.publish(subject("scheduler", "report"), report)
        await self.flush_kv_events()

    def _step(
        self, new: list[Request], budget: dict[str, int]
    ) -> tuple[list[StepOutput], list[str], list[tuple[Request, torch.Tensor]]]:
        """On the engine thread: add the plan's new requests, run it, and take each request
        whose prompt is done out of the engine with its KV."""
        failed = []
        for request in new:
            try:
                self.engine.add_request(request)
            except ValueError as e:
                logger.warning("request %s refused: %s", request.request_id, e)
                failed.append(request.request_id)
                budget.pop(request.request_id, None)
        outputs, not_fitting = self.engine.step_plan(budget)
        handoffs = [self.engine.hand_off(o.request.request_id) for o in outputs if not o.finished]
        return outputs, failed + not_fitting, handoffs

    async def _hand_off(self, request: Request, kv: torch.Tensor) -> None:
        """Send the KV in acked chunks, then the request itself, to its decode worker."""
        request_id = request.request_id
        decode_id = self.decode_of.pop(request_id, None)
        if decode_id is None or request_id in self.aborted:
            return
        spec = codec.request_to_spec(request)
        try:
            probe = await self.bus.request(
                subject("decode", decode_id, "probe"),
                engine_pb2.KVProbe(request=spec),
                engine_pb2.KVProbeReply,
                timeout=30.0,
            )
            num_reused = probe.num_cached_blocks  # the decode worker holds these already
            num_chunks = await send_kv(
                self.bus, subject("decode", decode_id, "kv"), request_id, kv[num_reused:]
            )
            handoff = engine_pb2.KVHandoff(
                request=spec,
                num_computed_tokens=request.num_computed_tokens,
                num_chunks=num_chunks,
                num_cached_tokens=max(request.num_cached_tokens, 0),
                prefill_worker_id=self.worker_id,
                num_reused_blocks=num_reused,
            )
            ack = await self.bus.request(
                subject("decode", decode_id, "handoff"),
                handoff,
                engine_pb2.KVHandoffAck,
                timeout=30.0,
            )
            if not ack.accepted:
                raise RuntimeError(ack.error)
        except Exception as e:
            logger.error("hand-off of %s to %s failed: %s", request_id, decode_id, e)
            await self._fail(request, f"hand-off to decode worker failed: {e}")

    async def _fail(self, request: Request, error: str) -> None:
        """End a request that cannot go on, telling the client (through the tokenizer)."""
        tokens = engine_pb2.RequestTokens(
            request_id=request.request_id, finish_reason="abort", stop_reason=error
        )
        await self.bus.publish(
            subject("tokens"), engine_pb2.TokenBatch(worker_id=self.worker_id, requests=[tokens])
        )

    async def shutdown(self) -> None:
        for task in list(self.transfers):
            task.cancel()
        await super().shutdown()
