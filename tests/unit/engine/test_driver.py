"""The engine's own thread keeps the process's torch thread count (torch's count is per
thread: a fresh thread's matmuls would otherwise spread over every core)."""

import asyncio
import ctypes
import os
import threading

import pytest
import torch

from tandem.engine.driver import EngineDriver


def _openmp_threads_of_this_thread():
    """What torch's CPU kernels will use on the calling thread: the OpenMP runtime's own
    per-thread setting (torch.get_num_threads() reports the process-wide one)."""
    torch.randn(64, 64) @ torch.randn(64, 64)  # the OpenMP runtime is loaded by now
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    if not paths:
        pytest.skip("torch is not built with OpenMP here")
    # torch's own runtime: other packages imported earlier in the run (scikit-learn, through
    # lm-eval and sentence-transformers) may have loaded copies of their own
    ours = sorted(p for p in paths if "/torch/" in p) or sorted(paths)
    return ctypes.CDLL(ours[0]).omp_get_max_threads


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to tell")
def test_engine_thread_uses_the_configured_torch_threads():
    omp_threads = _openmp_threads_of_this_thread()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = []  # a thread that does not set it: the test can tell the difference
        t = threading.Thread(target=lambda: plain.append(omp_threads()))
        t.start()
        t.join()
        thread = EngineDriver(config=None)
        on_engine_thread = asyncio.run(thread.call(omp_threads))
        thread.shutdown()
    finally:
        torch.set_num_threads(before)
    assert plain[0] > 1
    assert on_engine_thread == 1
