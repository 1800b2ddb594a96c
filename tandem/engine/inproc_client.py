"""The in-process engine client: an EngineCore on one thread of the caller's own process
(the colocated deployment, and the baseline that disaggregation is measured against)."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest

from tandem.engine.client import (
    EngineOverloaded,
    GenerateInput,
    GenerationChunk,
    PreparedPrompt,
    check_ids_free,
    logprob_entries,
)
from tandem.engine.config import EngineConfig
from tandem.engine.driver import EngineDriver
from tandem.engine.request import Request, RequestStatus
from tandem.services.observability.metrics import EngineCollector, WorkerMetrics, engine_stats

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Sub:
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    detok: object


class InProcessEngineClient:
    """An EngineCore on the engine driver's thread; requests and aborts reach it through a
    thread-safe queue, which the thread drains between steps. It steps while it has work,
    then hands back to the event loop until something new comes.

    The model loads on that thread once `start` is called, so the server answers /health
    (503) while it loads.
    """

    def __init__(
        self,
        config: EngineConfig,
        max_queued_requests: int | None = None,
        max_queued_tokens: int | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.config = config
        self.chat_template = chat_template
        self.max_queued_requests = max_queued_requests
        self.max_queued_tokens = max_queued_tokens
        self.max_model_len = config.model.max_model_len or 0
        self.vocab_size = 0
        self.tokenizer = None
        self.engine = None
        self.error: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._subs: dict[str, _Sub] = {}
        self._ready = threading.Event()
        self.driver = EngineDriver(config)
        self._wake: asyncio.Event | None = None  # something new in the inbox
        self._task: asyncio.Task | None = None
        self.registry = CollectorRegistry()
        labels = {"worker": "engine", "role": "colocated"}
        self.registry.register(EngineCollector(lambda: engine_stats(self.engine), labels))
        self.worker_metrics = WorkerMetrics(self.registry, "engine", "colocated")

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.error is None

    def stats(self) -> dict:
        """A snapshot of the engine's load (read without a lock: plain ints), in the shape
        the cluster client reports its workers."""
        engine = self.engine
        if engine is None:
            return {"workers": {}}
        load = {
            "role": "colocated",
            "num_running": len(engine.scheduler.running),
            "num_waiting": len(engine.scheduler.waiting),
            "num_blocks": engine.runner.info.num_blocks,
            "num_free_blocks": engine.kv.num_free_blocks,
            "block_size": engine.config.cache.block_size,
            "kv_cache_dtype": str(engine.runner.info.kv_cache_dtype).removeprefix("torch."),
            "num_preemptions": engine.scheduler.num_preemptions,
            "num_steps": engine.num_steps,
        }
        return {"workers": {"engine": load}}

    def metrics(self) -> list[str]:
        return [generate_latest(self.registry).decode()]

    async def start(self) -> None:
        """Load the engine on its thread and serve from it, in the background."""
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._serve(), name="engine")

    async def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)

    async def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True
    ) -> list[int]:
        from tandem.engine.preprocess import render_chat

        return render_chat(self.tokenizer, messages, add_generation_prompt)[1]

    async def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    async def submit(
        self, inputs: GenerateInput
    ) -> tuple[list[PreparedPrompt], list[AsyncIterator[GenerationChunk]]]:
        """Prepared as the tokenizer stage prepares it (`engine.preprocess`), then each
        prompt's samples prefilled once: one stream each. A request goes to the engine when
        its first stream is read."""
        from tandem.engine.preprocess import engine_requests, prepare

        check_ids_free(inputs.request_ids, self._subs)
        prompts, params = prepare(self.tokenizer, inputs, self.vocab_size, self.max_model_len)
        requests = engine_requests(inputs, prompts, params, time.time())
        self._admit(requests)  # all or none
        streams = []
        for request in requests:
            streams.extend(self._streams_of(request))
        return prompts, streams

    def _streams_of(self, request: Request) -> list[AsyncIterator[GenerationChunk]]:
        from tandem.engine.tokenizer import IncrementalDetokenizer

        params = request.sampling_params
        request_ids = [request.request_id, *request.fork_ids]
        loop = asyncio.get_running_loop()
        for rid in request_ids:
            detok = IncrementalDetokenizer(
                self.tokenizer,
                params.stop,
                params.include_stop_str_in_output,
                skip_special_tokens=params.skip_special_tokens,
            )
            self._subs[rid] = _Sub(loop, asyncio.Queue(), detok)
        submitted: list[bool] = []

        def submit() -> None:
            if not submitted:
                submitted.append(True)
                self._send("add", request)

        return [self._stream(rid, self._subs[rid], submit) for rid in request_ids]

    def _admit(self, requests: list[Request]) -> None:
        """The queue bounds, with `requests` added (read without a lock: a snapshot is
        enough for admission). Requests still in the inbox count as queued."""
        waiting = list(self.engine.scheduler.waiting)
        num_queued = len(waiting) + self._inbox.qsize()
        bound = self.max_queued_requests
        if bound is not None and num_queued + len(requests) > bound:
            raise EngineOverloaded(f"the queue holds {num_queued} requests (at most {bound})")
        if self.max_queued_tokens is not None:
            queued = sum(r.num_tokens for r in waiting)
            if queued + sum(r.num_tokens for r in requests) > self.max_queued_tokens:
                raise EngineOverloaded(
                    f"the queue holds {queued} tokens (at most {self.max_queued_tokens})"
                )

    async def _stream(self, request_id: str, sub: _Sub, submit) -> AsyncIterator[GenerationChunk]:
        finished = False
        try:
            submit()
            while not finished:
                item = await sub.out.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            self._subs.pop(request_id, None)
            if not finished:
                self._send("abort", request_id)

    async def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    async def reset_prefix_cache(self) -> None:
        self._send("reset", None)

    async def update_lora(self, name: str, path: str | None) -> None:
        self._send("lora", (name, path))

    async def shutdown(self) -> None:
        self._send("stop", None)
        if self._task is not None:
            await asyncio.wait([self._task], timeout=10)
        self.driver.shutdown()

    def _send(self, kind: str, payload) -> None:
        """To the engine's inbox (from the event loop's thread), waking the engine."""
        self._inbox.put((kind, payload))
        if self._wake is not None:
            self._wake.set()

    async def _serve(self) -> None:
        """Load, then run the engine until idle each time something new comes."""
        from tandem.engine.tokenizer import load_tokenizer

        try:
            self.engine = await self.driver.start()
            self.engine.grammars.on_compiled = self._grammar_ready
            self.tokenizer = await self.driver.call(
                load_tokenizer, self.config.model.model, self.chat_template
            )
            self.max_model_len = self.engine.max_model_len
            self.vocab_size = self.engine.runner.info.vocab_size
        except BaseException as e:  # reported through /health and the launcher
            logger.exception("engine failed to start")
            self.error = e
            self._ready.set()
            return
        self._ready.set()
        while True:
            self._wake.clear()
            if await self.driver.call(self._run_until_idle):
                return
            if self._inbox.empty():
                await self._wake.wait()

    # -- engine thread -------------------------------------------------------------------

    def _run_until_idle(self) -> bool:
        """On the engine's thread: take what the inbox holds and step, until there is
        nothing to do. True once the engine stopped (asked to, or failed)."""
        while True:
            try:
                while True:
                    kind, payload = self._inbox.get_nowait()
                    if kind == "stop":
                        return True
                    self._handle(kind, payload)
            except queue.Empty:
                pass
            if not self.engine.has_unfinished:
                return False
            try:
                self._step()
            except BaseException as e:  # the engine's own fault (a step's is a request's)
                logger.exception("the engine failed: no longer serving")
                self.error = e
                for sub in list(self._subs.values()):
                    sub.loop.call_soon_threadsafe(sub.out.put_nowait, RuntimeError(str(e)))
                return True

    def _grammar_ready(self, request_id: str, start_ns: int, end_ns: int, hit: bool, error):
        self.worker_metrics.observe_compile(start_ns, end_ns, hit)  # from the grammar thread

    def _handle(self, kind: str, payload) -> None:
        if kind == "abort":
            self.engine.abort(payload)
            return
        if kind == "reset":
            if not self.engine.reset_prefix_cache():
                logger.warning("prefix cache not reset: requests are running")
            return
        if kind == "lora":
            name, path = payload
            lora = self.engine.runner.lora
            try:
                if lora is not None:
                    lora.remove(name) if path is None else lora.add(name, path)
            except ValueError as e:
                logger.warning("LoRA adapter %s: %s", name, e)
            return
        request: Request = payload
        subs = [self._subs.get(rid) for rid in (request.request_id, *request.fork_ids)]
        if subs[0] is None:
            return  # the client left before the request reached the engine
        try:
            self.engine.add_request(request)
        except ValueError as e:
            for sub in subs:
                if sub is not None:
                    sub.loop.call_soon_threadsafe(sub.out.put_nowait, e)

    def _step(self) -> None:
        start = time.perf_counter()
        outputs = self.engine.step()
        self.worker_metrics.step_seconds.observe(time.perf_counter() - start)
        self.worker_metrics.batch_size.observe(self.engine.last_batch_size)
        self.worker_metrics.observe_grammars(self.engine)
        now = time.time()
        for out in outputs:
            req = out.request
            sub = self._subs.get(req.request_id)
            if sub is None:
                if not out.finished:
                    self.engine.abort(req.request_id)
                continue
            if out.error is not None:  # this request failed; the engine goes on
                sub.loop.call_soon_threadsafe(sub.out.put_nowait, RuntimeError(out.error))
                continue
            text = sub.detok.add_tokens(out.new_token_ids, out.finished)
            if sub.detok.stopped_on is not None and not out.finished:
                req.stop_reason = sub.detok.stopped_on
                self.engine.finish(req.request_id, RequestStatus.FINISHED_STOPPED)
            chunk = GenerationChunk(
                text,
                out.new_token_ids,
                req.status.finish_reason,
                req.stop_reason,
                req.num_prompt_tokens,
                max(req.num_cached_tokens, 0),
                now,
                logprob_entries(self.tokenizer, out.logprobs),
                logprob_entries(self.tokenizer, out.prompt_logprobs),
                None if out.pooled is None else out.pooled.tolist(),
            )
            sub.loop.call_soon_threadsafe(sub.out.put_nowait, chunk)
