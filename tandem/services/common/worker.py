"""What the prefill and decode worker shells share: the engine on its own thread, the
heartbeat and token messages they publish, and the memory of recent aborts."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore, StepOutput
from tandem.v1 import engine_pb2

HEARTBEAT_INTERVAL = 0.5  # seconds between heartbeats of an idle worker


def worker_id_for(role: str, given: str | None) -> str:
    """A worker id unique in the cluster: the given one, else role-host-pid."""
    return given or f"{role}-{os.uname().nodename}-{os.getpid()}"


class EngineThread:
    """An EngineCore that only ever runs on one dedicated thread, so the worker's event loop
    keeps moving messages (KV chunks, plans, aborts) while a step computes."""

    def __init__(self, config: EngineConfig) -> None:
        # torch's intra-op thread count is per thread: a new thread would use every core.
        self._pool = ThreadPoolExecutor(
            1,
            thread_name_prefix="engine",
            initializer=torch.set_num_threads,
            initargs=(torch.get_num_threads(),),
        )
        self.config = config
        self.engine: EngineCore | None = None

    async def start(self) -> EngineCore:
        self.engine = await self.call(EngineCore, self.config)
        return self.engine

    async def call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Tombstones:
    """Ids of requests aborted lately: a message about one that arrives after its abort (a
    plan, a hand-off) is dropped rather than resurrecting it."""

    def __init__(self, ttl: float = 120.0) -> None:
        self.ttl = ttl
        self._ids: dict[str, float] = {}

    def add(self, request_id: str) -> None:
        now = time.monotonic()
        self._ids[request_id] = now
        if len(self._ids) > 4096:
            self._ids = {k: t for k, t in self._ids.items() if now - t < self.ttl}

    def __contains__(self, request_id: str) -> bool:
        t = self._ids.get(request_id)
        return t is not None and time.monotonic() - t < self.ttl


def heartbeat(
    engine: EngineCore, worker_id: str, role: engine_pb2.WorkerRole, num_waiting: int = 0
) -> engine_pb2.Heartbeat:
    config = engine.config
    return engine_pb2.Heartbeat(
        worker_id=worker_id,
        role=role,
        num_blocks=engine.runner.info.num_blocks,
        num_free_blocks=engine.kv.num_free_blocks,
        num_running=len(engine.scheduler.running),
        num_waiting=num_waiting + len(engine.scheduler.waiting),
        block_size=config.cache.block_size,
        max_num_seqs=config.scheduler.max_num_seqs,
        max_model_len=engine.max_model_len,
        max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
        timestamp=time.time(),
        num_steps=engine.num_steps,
        num_preemptions=engine.scheduler.num_preemptions,
    )


def request_tokens(out: StepOutput) -> engine_pb2.RequestTokens:
    request = out.request
    stop = request.stop_reason
    msg = engine_pb2.RequestTokens(
        request_id=request.request_id,
        token_ids=out.new_token_ids,
        finish_reason=request.status.finish_reason or "" if out.finished else "",
        num_prompt_tokens=request.num_prompt_tokens,
        num_cached_tokens=max(request.num_cached_tokens, 0),
    )
    if isinstance(stop, int):
        msg.stop_token_id = stop
    elif stop:
        msg.stop_reason = stop
    return msg


async def run_worker(worker_cls, config: EngineConfig, nats_url: str, worker_id: str) -> None:
    """Connect, start, run until cancelled, shut down: the prefill and decode entry points."""
    from tandem.services.common.bus import Bus

    worker = worker_cls(config, await Bus.connect(nats_url, worker_id), worker_id)
    await worker.start()
    try:
        await worker.run()
    finally:
        await worker.shutdown()
