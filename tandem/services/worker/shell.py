"""What the prefill and decode worker shells share: the engine on its own thread (the
engine's driver), the heartbeat and token messages they publish."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import time

from prometheus_client import CollectorRegistry

from tandem.engine.block_pool import KVCacheEvent, KVEventKind
from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore, StepOutput
from tandem.engine.driver import EngineDriver
from tandem.services.observability import tracing
from tandem.services.observability.metrics import EngineCollector, WorkerMetrics, engine_stats
from tandem.services.observability.metrics_push import MetricsPublisher
from tandem.services.transport import codec
from tandem.services.transport.bus import Tombstones
from tandem.services.transport.kv_transfer import DTYPE_NAMES
from tandem.services.transport.subjects import subject
from tandem.v1 import engine_pb2

logger = logging.getLogger(__name__)
HEARTBEAT_INTERVAL = 0.5  # seconds between heartbeats of an idle worker
DRAIN_POLL = 0.25  # seconds between a draining worker's checks
TRANSIT_GRACE = 30.0  # seconds past its shutdown timeout a worker waits for work on its way


def worker_id_for(role: str, given: str | None) -> str:
    """A worker id unique in the cluster: the given one, else role-host-pid."""
    return given or f"{role}-{os.uname().nodename}-{os.getpid()}"


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
        vocab_size=engine.runner.info.vocab_size,
        kv_cache_dtype=DTYPE_NAMES[engine.runner.info.kv_cache_dtype],
        timestamp=time.time(),
        num_steps=engine.num_steps,
        num_preemptions=engine.scheduler.num_preemptions,
        prefix_cache_queries=engine.kv.prefix_queries,
        prefix_cache_hits=engine.kv.prefix_hits,
        lora_adapters=engine.runner.lora.resident if engine.runner.lora else (),
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
        first_output_index=request.num_output_tokens - len(out.new_token_ids),
    )
    if isinstance(stop, int):
        msg.stop_token_id = stop
    elif stop:
        msg.stop_reason = stop
    if out.error is not None:
        msg.finish_reason, msg.stop_reason = "abort", out.error
    if out.logprobs:
        msg.logprobs.extend(codec.logprobs_to_proto(lp) for lp in out.logprobs)
    if out.prompt_logprobs:
        msg.prompt_logprobs.extend(codec.logprobs_to_proto(lp) for lp in out.prompt_logprobs)
    if out.pooled is not None:
        msg.pooled.CopyFrom(codec.pooled_to_proto(out.pooled))
    return msg


class WorkerShell:
    """What both worker kinds do around their own loop: the engine on its thread, aborts,
    heartbeats (on a timer, even mid-step), and the prefix-cache events that keep the
    cluster's index true (with a full restatement on request and on start, and a reset).

    Lifecycle: start (load the engine, subscribe, announce) -> run -> shutdown. Subclasses
    give `role`, `subscribe()`, `loop()`, and optionally `forget()` and `num_waiting()`."""

    role: engine_pb2.WorkerRole

    def __init__(self, config: EngineConfig, bus, worker_id: str) -> None:
        self.bus = bus
        self.worker_id = worker_id
        self.driver = EngineDriver(config)
        self.aborted = Tombstones()
        self.kv_seq = 0
        self.draining = False
        self.engine: EngineCore | None = None
        self.registry = CollectorRegistry()
        role = codec.ROLE_NAMES[self.role]
        labels = {"worker": worker_id, "role": role}
        self.registry.register(
            EngineCollector(lambda: engine_stats(self.engine, self.num_waiting()), labels)
        )
        self.metrics = WorkerMetrics(self.registry, worker_id, role)
        self.publisher = MetricsPublisher(bus, self.registry, worker_id, role)

    async def start(self) -> None:
        self.engine = await self.driver.start()
        self.engine.kv.pool.enable_events()
        loop = asyncio.get_running_loop()
        self.engine.grammars.on_compiled = functools.partial(
            loop.call_soon_threadsafe, self.grammar_ready
        )
        await self.subscribe()
        subs = [
            (subject("abort"), engine_pb2.AbortRequest, self._on_abort),
            (subject("kv", "resync", self.worker_id), engine_pb2.KVResyncRequest, self._resync),
            (subject("reset_prefix_cache"), engine_pb2.ResetPrefixCache, self._on_reset),
            (subject("lora_adapters"), engine_pb2.LoRAAdapterUpdate, self._on_lora),
            (subject("worker", "lost"), engine_pb2.WorkerLost, self._on_lost),
        ]
        for subj, msg_type, handler in subs:
            await self.bus.subscribe(subj, msg_type, handler)
        await self.bus.flush()
        await self._resync(None, None)  # whatever the index held for this id is stale
        logger.info("%s ready", self.worker_id)

    async def subscribe(self) -> None:
        """Subscribe to this kind's own subjects."""

    async def loop(self) -> None:
        raise NotImplementedError

    def forget(self, request_id: str) -> None:
        """Drop this shell's own state of an aborted request."""

    async def drop_all(self) -> list[str]:
        """Drop every request held here, telling no one (see `_on_lost`); their ids."""
        request_ids = await self.driver.call(self.engine.abort_all)
        for request_id in request_ids:  # not tombstoned: they may be placed here again
            self.forget(request_id)
        return request_ids

    async def _on_lost(self, msg: engine_pb2.WorkerLost, raw) -> None:
        """The scheduler gave this worker up (its heartbeats were late): its requests were
        re-queued elsewhere, with the tokens their clients have. Going on with them would
        run each twice, so they are dropped here; the worker then serves as a new one."""
        if msg.worker_id != self.worker_id:
            return
        dropped = await self.drop_all()
        logger.warning("%s was declared lost: dropped %d request(s) placed elsewhere now",
                       self.worker_id, len(dropped))  # fmt: skip
        if dropped:  # whichever the tokenizer has not re-queued yet, it re-queues now
            batch = engine_pb2.TokenBatch(worker_id=self.worker_id, timestamp=time.time())
            for request_id in dropped:
                batch.requests.add(request_id=request_id, dropped=True)
            await self.bus.publish(subject("tokens"), batch)
        await self._resync(None, None)  # the scheduler dropped its index entries

    def num_waiting(self) -> int:
        return 0

    def idle(self) -> bool:
        """Nothing in progress here (subclasses add what they hold besides the engine)."""
        return not self.engine.has_unfinished

    def join_core_loan(self, directory: str, threads: int) -> None:
        """Take part in the machine's core loan (core_loan.py): the roles override this."""

    async def hand_back(self) -> None:
        """Give back what could not finish before the shutdown timeout."""

    async def drain(self, timeout: float) -> None:
        """Leave the cluster without losing a request (SIGTERM): ask the scheduler to place
        nothing more here, finish everything placed here (work still on its way included),
        after `timeout` hand back what is left (and what still arrives, for at most
        TRANSIT_GRACE more seconds), then say it is gone."""
        self.draining = True
        await self.send_heartbeat()
        deadline = time.monotonic() + timeout
        logger.info("%s draining (at most %.0f s)", self.worker_id, timeout)
        handing_back = False
        while True:
            pending = await self._drain_request(done=False)
            if handing_back:
                await self.hand_back()
            if pending == 0 and self.idle():
                break
            now = time.monotonic()
            if not handing_back and now > deadline:
                logger.warning("%s: shutdown timeout, handing back what is left", self.worker_id)
                handing_back = True
                continue
            if now > deadline + TRANSIT_GRACE:
                logger.warning("%s: %d hand-off(s) never arrived", self.worker_id, pending)
                break
            await asyncio.sleep(DRAIN_POLL)
        await self._drain_request(done=True)
        logger.info("%s drained", self.worker_id)

    async def _drain_request(self, done: bool) -> int:
        """Tell the scheduler; returns how many requests placed here have not arrived yet
        (0 when the scheduler does not answer: then only this worker's own state counts)."""
        msg = engine_pb2.DrainRequest(worker_id=self.worker_id, done=done)
        try:
            reply = await self.bus.request(
                subject("scheduler", "drain"), msg, engine_pb2.DrainReply, timeout=2.0
            )
        except Exception as e:
            logger.warning("scheduler did not answer the drain request: %s", e)
            return 0
        return reply.num_pending

    async def run(self) -> None:
        beats = asyncio.create_task(self._heartbeats())
        self.publisher.start()
        try:
            await self.loop()
        finally:
            beats.cancel()
            self.publisher.stop()

    async def timed_step(self, fn, *args):
        """Run `fn` on the engine thread as one engine step, into the step metrics.
        Returns (result, start_ns, end_ns)."""
        start = time.time_ns()
        result = await self.driver.call(fn, *args)
        end = time.time_ns()
        self.metrics.step_seconds.observe((end - start) / 1e9)
        self.metrics.batch_size.observe(self.engine.last_batch_size)
        self.metrics.observe_grammars(self.engine)
        return result, start, end

    def grammar_ready(self, request_id: str, start_ns: int, end_ns: int, hit: bool, error):
        """On the event loop: a request's grammar compiled (or came from the cache, or
        failed): into the metrics, and a span under the request's when it is traced."""
        self.metrics.observe_compile(start_ns, end_ns, hit)
        parent = self.trace_parent(request_id)
        if parent is not None:
            tracing.record_compile_span(parent, request_id, start_ns, end_ns, hit, error)

    def trace_parent(self, request_id: str):
        """The trace context a span of this request's work here goes under (None: none)."""
        return None

    async def publish_tokens(self, outputs: list[StepOutput], step_id: int) -> None:
        """One step's new tokens of all its requests, stamped for the stream-lag metric."""
        batch = engine_pb2.TokenBatch(
            worker_id=self.worker_id, step_id=step_id, timestamp=time.time()
        )
        batch.requests.extend(request_tokens(o) for o in outputs)
        await self.bus.publish(subject("tokens"), batch)

    async def _on_abort(self, msg: engine_pb2.AbortRequest, raw) -> None:
        self.aborted.add(msg.request_id)
        self.forget(msg.request_id)
        await self.driver.call(self.engine.abort, msg.request_id)

    def heartbeat(self) -> engine_pb2.Heartbeat:
        msg = heartbeat(self.engine, self.worker_id, self.role, self.num_waiting())
        msg.draining = self.draining
        return msg

    async def send_heartbeat(self) -> None:
        await self.bus.publish(subject("heartbeat"), self.heartbeat())

    async def _heartbeats(self) -> None:
        while True:
            await self.send_heartbeat()
            await self.tick()
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def tick(self) -> None:
        """Housekeeping on the heartbeat timer (subclasses: expiring leases)."""

    async def flush_kv_events(self) -> None:
        """Publish the prefix-cache changes since the last flush (taken on the engine
        thread, which is the only one that changes the pool)."""
        await self._publish_kv(await self.driver.call(self.engine.kv.pool.take_events))

    async def _publish_kv(self, events: list[KVCacheEvent], full_resync: bool = False) -> None:
        if not events and not full_resync:
            return
        batch = kv_event_batch(self.worker_id, self.kv_seq, events, full_resync)
        self.kv_seq += 1
        await self.bus.publish(subject("kv", "events"), batch)

    async def _resync(self, msg, raw) -> None:
        await self._publish_kv(await self.driver.call(self._cache_snapshot), full_resync=True)

    def _cache_snapshot(self) -> list[KVCacheEvent]:
        """On the engine thread: the whole prefix cache as STORED events (pending events are
        subsumed by it)."""
        pool = self.engine.kv.pool
        pool.take_events()
        return [KVCacheEvent(KVEventKind.STORED, h) for h in pool.cached]

    async def _on_reset(self, msg, raw) -> None:
        if not await self.driver.call(self.engine.reset_prefix_cache):
            logger.warning("prefix cache not reset: requests are running")
        await self.flush_kv_events()

    async def _on_lora(self, msg, raw) -> None:
        """A LoRA adapter loaded or unloaded at run time (a worker without --enable-lora
        ignores it; a bad adapter is logged: its requests are refused with the reason)."""
        lora = self.engine.runner.lora
        if lora is None:
            return
        try:
            if msg.unload:
                await self.driver.call(lora.remove, msg.lora_name)
            else:
                await self.driver.call(lora.add, msg.lora_name, msg.lora_path)
        except ValueError as e:
            logger.warning("LoRA adapter %s: %s", msg.lora_name, e)

    async def shutdown(self) -> None:
        self.driver.shutdown()
        await self.bus.close()


def kv_event_batch(
    worker_id: str, seq: int, events: list[KVCacheEvent], full_resync: bool = False
) -> engine_pb2.KVEventBatch:
    """Events as one message; runs of the same kind share one entry."""
    batch = engine_pb2.KVEventBatch(worker_id=worker_id, seq=seq, full_resync=full_resync)
    last = None
    for event in events:
        if event.kind is KVEventKind.CLEARED:
            batch.events.add(cleared=engine_pb2.AllBlocksCleared())
            last = None
        elif event.kind is KVEventKind.STORED:
            if last is None or not last.HasField("stored"):
                last = batch.events.add()
                last.stored.parent_block_hash = event.parent_hash
            last.stored.block_hashes.append(event.block_hash)
        else:
            if last is None or not last.HasField("removed"):
                last = batch.events.add()
                last.removed.SetInParent()
            last.removed.block_hashes.append(event.block_hash)
    return batch


async def run_worker(
    worker_cls,
    config: EngineConfig,
    nats_url: str,
    worker_id: str,
    health_port: int | None = None,
    shutdown_timeout: float = 30.0,
    core_loan: tuple[str | None, int] = (None, 0),
) -> None:
    """Connect, start, run until cancelled or SIGTERM (then drain), shut down: the prefill
    and decode entry points. `/health` on `health_port` when given (503 while loading);
    `core_loan` (its directory, the threads on borrowed cores): core_loan.py."""
    from tandem.services.observability.health import HealthServer
    from tandem.services.transport.bus import Bus

    worker = worker_cls(config, await Bus.connect(nats_url, worker_id), worker_id)
    if core_loan[0]:
        worker.join_core_loan(*core_loan)
    health = HealthServer(health_port, registry=worker.registry) if health_port else None
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        if health is not None:
            await health.start()
        await worker.start()
        if health is not None:
            health.up = True
        running = asyncio.create_task(worker.run())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if running.done():
            stopping.cancel()
            running.result()  # the loop ended by itself: its error is the worker's
        if stop.is_set():
            if health is not None:
                health.draining = True
            await worker.drain(shutdown_timeout)
        for task in (running, stopping):
            task.cancel()
        await asyncio.gather(running, stopping, return_exceptions=True)
    finally:
        if health is not None:
            await health.stop()
        await worker.shutdown()
