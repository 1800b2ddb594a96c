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

import torch
from prometheus_client import CollectorRegistry, generate_latest

from tandem.engine.client import (
    EngineOverloaded,
    GenerateOne,
    GenerationChunk,
    check_ids_free,
    logprob_entries,
)
from tandem.engine.config import EngineConfig
from tandem.engine.request import Request, RequestStatus, SamplingParams
from tandem.services.observability.metrics import EngineCollector, WorkerMetrics, engine_stats

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Sub:
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    detok: object


class InProcessEngineClient(GenerateOne):
    """EngineCore on one thread; requests and aborts reach it through a thread-safe queue.

    The model loads on the thread too, so the server answers /health (503) while it loads.
    """

    def __init__(
        self,
        config: EngineConfig,
        max_queued_requests: int | None = None,
        max_queued_tokens: int | None = None,
    ) -> None:
        self.config = config
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
        self._num_threads = torch.get_num_threads()  # per thread in torch: set it there too
        self.registry = CollectorRegistry()
        labels = {"worker": "engine", "role": "colocated"}
        self.registry.register(EngineCollector(lambda: engine_stats(self.engine), labels))
        self.worker_metrics = WorkerMetrics(self.registry, "engine", "colocated")
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.error is None

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout) and self.error is None

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
            "num_preemptions": engine.scheduler.num_preemptions,
            "num_steps": engine.num_steps,
        }
        return {"workers": {"engine": load}}

    def metrics(self) -> list[str]:
        return [generate_latest(self.registry).decode()]

    async def start(self) -> None:
        """The engine loads on its own thread from construction on: nothing to connect."""

    async def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)

    async def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True
    ) -> list[int]:
        """Render with the tokenizer's chat template, then encode the text without adding
        special tokens (the template places its own), as vLLM does."""
        from jinja2 import TemplateError

        if not messages:
            raise ValueError("messages must not be empty")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                "messages must not be given: the model's tokenizer has no chat template"
            )
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except (TemplateError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"messages must fit the model's chat template: {e}") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def generate_many(
        self,
        request_ids: list[str],
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
        trace_context: dict[str, str] | None = None,
    ) -> list[AsyncIterator[GenerationChunk]]:
        """len(request_ids) samples of one prompt, prefilled once: one stream each. The
        request goes to the engine when the first stream is read."""
        from tandem.engine.tokenizer import IncrementalDetokenizer

        check_ids_free(request_ids, self._subs)
        request = Request(
            request_ids[0], prompt_token_ids, params, priority=priority, cache_salt=cache_salt
        )
        request.fork_ids = tuple(request_ids[1:])
        # Validate here, on the caller's side, so bad input raises before any streaming.
        if request.num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt has {request.num_prompt_tokens} tokens; max_model_len is "
                f"{self.max_model_len} and at least one token must be generated"
            )
        self._admit(request)
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
                self._inbox.put(("add", request))

        return [self._stream(rid, self._subs[rid], submit) for rid in request_ids]

    def _admit(self, request: Request) -> None:
        """The queue bounds (read without a lock: a snapshot is enough for admission).
        Requests still in the inbox count as queued."""
        waiting = list(self.engine.scheduler.waiting)
        num_queued = len(waiting) + self._inbox.qsize()
        if self.max_queued_requests is not None and num_queued >= self.max_queued_requests:
            raise EngineOverloaded(f"the queue holds {num_queued} requests (the maximum)")
        if self.max_queued_tokens is not None:
            queued = sum(r.num_tokens for r in waiting)
            if queued + request.num_tokens > self.max_queued_tokens:
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
                self._inbox.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    async def reset_prefix_cache(self) -> None:
        self._inbox.put(("reset", None))

    async def shutdown(self) -> None:
        self._inbox.put(("stop", None))

    # -- engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_num_threads(self._num_threads)
        try:
            from tandem.engine.core import EngineCore
            from tandem.engine.tokenizer import load_tokenizer

            self.engine = EngineCore(self.config)
            self.tokenizer = load_tokenizer(self.config.model.model)
            self.max_model_len = self.engine.max_model_len
            self.vocab_size = self.engine.runner.info.vocab_size
        except BaseException as e:  # reported through /health and the launcher
            logger.exception("engine failed to start")
            self.error = e
            self._ready.set()
            return
        self._ready.set()
        while True:
            block = not self.engine.has_unfinished
            try:
                while True:
                    kind, payload = self._inbox.get(block=block)
                    block = False
                    if kind == "stop":
                        return
                    self._handle(kind, payload)
            except queue.Empty:
                pass
            if self.engine.has_unfinished:
                try:
                    self._step()
                except BaseException as e:  # the engine's own fault (a step's is a request's)
                    logger.exception("the engine failed: no longer serving")
                    self.error = e
                    for sub in list(self._subs.values()):
                        sub.loop.call_soon_threadsafe(sub.out.put_nowait, RuntimeError(str(e)))
                    return

    def _handle(self, kind: str, payload) -> None:
        if kind == "abort":
            self.engine.abort(payload)
            return
        if kind == "reset":
            if not self.engine.reset_prefix_cache():
                logger.warning("prefix cache not reset: requests are running")
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
            )
            sub.loop.call_soon_threadsafe(sub.out.put_nowait, chunk)
