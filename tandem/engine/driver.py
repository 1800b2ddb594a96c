"""The one way an EngineCore runs beside an event loop: on a dedicated thread of its own, so
the loop keeps moving messages (HTTP, KV chunks, plans, aborts) while a step computes. The
in-process client (colocated) and both worker kinds drive their engine through it."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch

from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore


class EngineDriver:
    """An EngineCore that only ever runs on one thread: built there (`start`), and every call
    on it made there (`call`), in order."""

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
        """Load the model and build the engine, on the engine's thread."""
        self.engine = await self.call(EngineCore, self.config)
        return self.engine

    async def call(self, fn, *args):
        """`fn(*args)` on the engine's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
