"""The engine's own thread keeps the process's torch thread count (torch's count is per
thread: a fresh thread's matmuls would otherwise spread over every core)."""

import asyncio
import os
import time

import pytest
import torch

from tandem.services.common.worker import EngineThread


def _matmul_seconds() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, time.perf_counter() - t)
    return best


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to tell")
def test_engine_thread_uses_the_configured_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        thread = EngineThread(config=None)
        on_engine_thread = asyncio.run(thread.call(_matmul_seconds))
        thread.shutdown()
        on_main_thread = _matmul_seconds()
    finally:
        torch.set_num_threads(before)
    # One thread each: the same speed. With every core, the engine thread runs ~2x faster.
    assert on_engine_thread > 0.75 * on_main_thread, (on_engine_thread, on_main_thread)
