"""A request the scheduler stage fails on after acking it is ended with an error through its
stream (never left waiting): its client gets an answer."""

from __future__ import annotations

import asyncio

from tandem.services.scheduler.core import ClusterScheduler
from tandem.services.scheduler.service import SchedulerService
from tandem.v1 import common_pb2, engine_pb2


class RecordingBus:
    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []

    async def publish(self, subj, msg, headers=None) -> None:
        self.sent.append((subj, msg))


class BrokenCore(ClusterScheduler):
    def add_request(self, request, front=False) -> None:
        raise RuntimeError("a bug")


def test_a_failure_after_the_ack_ends_the_request_with_a_500():
    bus = RecordingBus()
    service = SchedulerService(bus, BrokenCore(), None)
    spec = common_pb2.RequestSpec(request_id="r1", prompt_token_ids=[1, 2, 3],
                                  fork_ids=["r1-1"])  # fmt: skip
    asyncio.run(service._add(spec, front=False))
    batches = [m for _, m in bus.sent if isinstance(m, engine_pb2.TokenBatch)]
    aborts = [m.request_id for _, m in bus.sent if isinstance(m, engine_pb2.AbortRequest)]
    ended = {(t.request_id, t.finish_reason, t.error_code) for b in batches for t in b.requests}
    assert ended == {("r1", "abort", 500), ("r1-1", "abort", 500)}
    assert "RuntimeError: a bug" in batches[0].requests[0].stop_reason
    assert aborts == ["r1", "r1-1"]
