"""The decode worker's loop around its engine (services/decode/service.py), with the engine,
the bus and the engine thread replaced by fakes: a request that arrives while the loop sends
(its awaits hand the event loop to NATS's handlers) is admitted, never left waiting; a
step's results go out while the next step runs, in order."""

from __future__ import annotations

import asyncio
from collections import deque
from types import SimpleNamespace

from tandem.services.decode.service import DecodeWorker


class FakeEngine:
    def __init__(self, steps: int) -> None:
        self.steps_left = steps

    @property
    def has_unfinished(self) -> bool:
        return self.steps_left > 0


def bare_worker(engine: FakeEngine) -> DecodeWorker:
    """A DecodeWorker without its engine, bus or thread: only what its loop reads."""
    worker = object.__new__(DecodeWorker)
    worker.engine = engine
    worker.arrivals, worker.local = deque(), deque()
    worker.received_ids, worker.local_since, worker.spans = [], {}, {}
    worker.wake = asyncio.Event()
    return worker


def test_a_request_arriving_while_the_idle_loop_sends_is_admitted():
    async def scenario():
        worker = bare_worker(FakeEngine(0))
        admitted = asyncio.Event()

        async def flush_kv_events():  # NATS delivers a LocalPrefill during this await
            if not admitted.is_set():
                worker.local.append("req-1")
                worker.wake.set()

        async def admit():
            worker.local.clear()
            admitted.set()

        worker.flush_kv_events = flush_kv_events
        worker._admit_arrivals = admit
        loop = asyncio.create_task(worker.loop())
        try:
            await asyncio.wait_for(admitted.wait(), timeout=2.0)
        finally:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)

    asyncio.run(scenario())


def test_each_steps_results_go_out_in_order_while_the_next_step_runs():
    """The next step is queued on the engine thread before the last one's results are sent
    (queued, not merely created as a coroutine that would start only once awaited)."""

    async def scenario():
        engine = FakeEngine(3)
        worker = bare_worker(engine)
        events = []

        class FakeDriver:
            def submit(self, fn):
                step = 4 - engine.steps_left
                events.append(f"step {step} starts")

                async def run():
                    await asyncio.sleep(0.01)
                    engine.steps_left -= 1
                    events.append(f"step {step} ends")
                    return SimpleNamespace(step=step, start_ns=0, end_ns=0)

                return asyncio.ensure_future(run())

        async def send_step(done):
            events.append(f"step {done.step} sent")

        async def flush_kv_events():
            pass

        worker.driver = FakeDriver()
        worker.observe_step = lambda start_ns, end_ns: None
        worker._send_step = send_step
        worker.flush_kv_events = flush_kv_events
        loop = asyncio.create_task(worker.loop())
        await asyncio.sleep(0.2)
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        return events

    assert asyncio.run(scenario()) == [
        "step 1 starts", "step 1 ends",
        "step 2 starts", "step 1 sent", "step 2 ends",
        "step 3 starts", "step 2 sent", "step 3 ends",
        "step 3 sent",
    ]  # fmt: skip
