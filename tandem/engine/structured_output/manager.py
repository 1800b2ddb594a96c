"""Compiling grammars off the step loop, caching them, and each request's matcher.

A request with a constraint gets a `RequestGrammar` when it enters an engine. Its grammar
compiles on this worker's grammar thread (once per spec: compiled grammars are cached, LRU),
and meanwhile the request waits, as vLLM's WAITING_FOR_FSM: it may compute every token but
the one it samples from, and the rest of the batch keeps stepping. When the compile is done
the matcher is built and the request's tokens so far are replayed into it: that is how a
request prefilled elsewhere, moved after a preemption, or re-queued after its decode
worker died continues exactly where it was.

The tokenizer (and each backend's view of it) loads on the grammar thread with a worker's
first constrained request: about 3 s of CPU here, mostly importing transformers, which a
server that never sees one does not pay (done at start, it slowed every start and the first
seconds of serving on a 2-core machine).

Per step, the sampling rows of constrained requests get their allowed tokens as a bitmask
(one int32 per 32 tokens, xgrammar's and llguidance's shared layout), applied to the logits
before anything else (`sampler.process_logits`); each sampled token then advances its
matcher, and a grammar that reached its end (EOS accepted) ends the request.

With a reasoning parser (a chat request to a server started with `--reasoning-parser`), the
constraint starts where the reasoning ends, as in vLLM: tokens up to and including the end
marker (`</think>`) are free and never reach the matcher (`ReasoningGate`)."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tandem.engine.structured_output import backends
from tandem.engine.structured_output.params import REASONING_MARKERS, StructuredOutputsParams
from tandem.kernels import cpu as cpu_kernels
from tandem.kernels.cpu import load_cpu_kernels

logger = logging.getLogger(__name__)
CACHE_SIZE = 256  # compiled grammars kept per worker


@dataclass(slots=True)
class GrammarStats:
    """For /metrics: the time each step spent on bitmasks (filled and applied) since the
    owner last drained them, and the requests waiting on a compile now."""

    mask_seconds: list[float] = field(default_factory=list)
    num_waiting: int = 0

    def drain_mask_seconds(self) -> list[float]:
        taken, self.mask_seconds = self.mask_seconds, []
        return taken


class ReasoningGate:
    """Whether a request is still reasoning. The prompt's last marker decides where it
    starts, as vLLM's `is_reasoning_end` (a template that closed the thinking, e.g. Qwen3's
    with `enable_thinking: false`, starts past it); in the output, the reasoning ends with
    the end marker, for good."""

    __slots__ = ("end", "recent", "ended")

    def __init__(self, start: list[int], end: list[int], prompt: list[int]) -> None:
        self.end = end
        self.recent: list[int] = []
        self.ended = _last_marker(prompt, start, end) == "end"

    def feed(self, token_id: int) -> bool:
        """Take one output token; True when it belongs to the constrained part."""
        if self.ended:
            return True
        self.recent = (self.recent + [token_id])[-len(self.end) :]
        self.ended = self.recent == self.end
        return False  # reasoning, or the end marker's own last token

    def fork(self) -> ReasoningGate:
        copy = ReasoningGate([], self.end, [])
        copy.recent, copy.ended = list(self.recent), self.ended
        return copy


def _last_marker(ids: list[int], start: list[int], end: list[int]) -> str | None:
    """Which of the two token sequences occurs last in `ids` ("start", "end" or None)."""
    for i in range(len(ids) - 1, -1, -1):
        for name, marker in (("end", end), ("start", start)):
            if marker and ids[i : i + len(marker)] == marker:
                return name
    return None


class RequestGrammar:
    """One request's constraint: compiling, then a matcher (or the compile's error)."""

    __slots__ = ("future", "matcher", "error", "replay", "rejected", "make", "gate")

    def __init__(self, future: Future | None, replay: list[int], make) -> None:
        self.future = future
        self.matcher = None
        self.error: str | None = None
        self.replay = replay  # tokens generated before the matcher existed
        self.rejected = False  # a sampled token the grammar did not allow
        self.make = make  # compiled grammar -> (matcher, ReasoningGate or None)
        self.gate: ReasoningGate | None = None

    def is_ready(self) -> bool:
        """Whether the matcher exists (built here, on the engine's thread, once the compile
        is done: the tokens so far replayed into it)."""
        if self.matcher is not None:
            return True
        if self.future is None or not self.future.done() or self.error is not None:
            return False
        try:
            matcher, self.gate = self.make(self.future.result()[0])
        except Exception as e:  # a compile that failed here although the spec was checked
            self.error = f"structured output grammar could not be compiled: {e}"
            return False
        for token_id in self.replay:
            if self.gate is not None and not self.gate.feed(token_id):
                continue
            if not matcher.accept(token_id):
                self.error = f"token {token_id} generated earlier breaks the grammar"
                return False
        self.matcher, self.replay = matcher, []
        return True

    @property
    def failed(self) -> bool:
        if self.error is None and self.future is not None and self.future.done():
            exc = self.future.exception()
            if exc is not None:
                self.error = f"structured output grammar could not be compiled: {exc}"
        return self.error is not None

    @property
    def terminated(self) -> bool:
        return self.rejected or (self.matcher is not None and self.matcher.terminated)

    @property
    def constraining(self) -> bool:
        """Whether the next token is masked: the matcher is there, reasoning (if any) over."""
        return (
            self.matcher is not None
            and not self.terminated
            and (self.gate is None or self.gate.ended)
        )

    def accept(self, token_id: int) -> None:
        if self.gate is not None and not self.gate.feed(token_id):
            return
        if not self.matcher.accept(token_id):
            self.rejected = True
            logger.warning("token %d is outside the grammar: the request ends", token_id)

    def fork(self) -> RequestGrammar:
        """An independent copy at the same position (a sample of n > 1)."""
        copy = RequestGrammar(self.future, list(self.replay), self.make)
        copy.matcher = None if self.matcher is None else self.matcher.fork()
        copy.gate = None if self.gate is None else self.gate.fork()
        return copy


class GrammarManager:
    """A worker's compiles, cache and matchers, for the model folder's tokenizer."""

    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_id: int | None) -> None:
        self.model_dir = model_dir
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.pool: ThreadPoolExecutor | None = None  # started with the first constraint
        self.cache: OrderedDict[tuple, object] = OrderedDict()
        self.lock = threading.Lock()
        self.ready = threading.Event()  # set when any compile ends
        self.stats = GrammarStats()
        self.pending: dict[str, object] = {}  # request id -> request, its grammar compiling
        # called on the grammar thread as each request's grammar is ready (or failed):
        # (request_id, submitted_ns, done_ns (wall clock), cache_hit, error or None) -> None
        self.on_compiled = None
        self._tokenizer = None
        self._xgrammar = None  # GrammarCompiler
        self._guidance = None  # LLTokenizer

    # -- the grammar thread ------------------------------------------------------------------

    def _hf_tokenizer(self):
        if self._tokenizer is None:
            from tandem.engine.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_dir)
        return self._tokenizer

    def _xgrammar_compiler(self):
        if self._xgrammar is None:
            import xgrammar as xgr

            stop = [] if self.eos_token_id is None else [self.eos_token_id]
            info = xgr.TokenizerInfo.from_huggingface(
                self._hf_tokenizer(), vocab_size=self.vocab_size, stop_token_ids=stop
            )
            self._xgrammar = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._xgrammar

    def _guidance_tokenizer(self):
        if self._guidance is None:
            import llguidance.hf

            self._guidance = llguidance.hf.from_tokenizer(self._hf_tokenizer(), self.vocab_size)
        return self._guidance

    def _executor(self) -> ThreadPoolExecutor:
        if self.pool is None:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        return self.pool

    def _compile(self, params: StructuredOutputsParams) -> tuple:
        """(compiled grammar, whether the cache had it)."""
        with self.lock:
            compiled = self.cache.get(params.key)
            if compiled is not None:
                self.cache.move_to_end(params.key)
                return compiled, True
        if params.backend == "guidance":
            compiled = backends.guidance_grammar(params)
            self._guidance_tokenizer()
        else:
            compiled = backends.xgrammar_compile(self._xgrammar_compiler(), params)
        with self.lock:
            self.cache[params.key] = compiled
            if len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
        return compiled, False

    def _done(self, request_id: str, submitted_ns: int, future: Future) -> None:
        """On the grammar thread, once the future holds the result: wake a waiting engine
        and tell the owner (`on_compiled`) how long the request waited."""
        self.ready.set()
        if self.on_compiled is None or future.cancelled():
            return
        error = future.exception()
        hit = error is None and future.result()[1]
        self.on_compiled(request_id, submitted_ns, time.time_ns(), hit,
                         None if error is None else str(error))  # fmt: skip

    # -- the engine's thread -----------------------------------------------------------------

    def start(self, request) -> None:
        """Give a constrained request its grammar: compiling, or at once from the cache."""
        params = request.sampling_params.structured_outputs
        if params is None:
            return
        if params.backend == "guidance":

            def new_matcher(grammar):  # noqa: E306
                return backends.GuidanceMatcher.new(
                    self._guidance_tokenizer(), grammar, self.eos_token_id
                )
        else:
            new_matcher = backends.XgrammarMatcher.new
        prompt = request.prompt_token_ids

        def make(grammar):  # on the engine thread, once compiled (the tokenizer is loaded)
            return new_matcher(grammar), self._reasoning_gate(params.reasoning_parser, prompt)

        submitted = time.time_ns()
        with self.lock:
            compiled = self.cache.get(params.key)
            if compiled is not None:
                self.cache.move_to_end(params.key)
        if compiled is not None:  # cached: ready now, no trip through the grammar thread
            future = Future()
            future.set_result((compiled, True))
        else:
            future = self._executor().submit(self._compile, params)
        request.grammar = RequestGrammar(future, list(request.output_token_ids), make)
        self.pending[request.request_id] = request
        future.add_done_callback(functools.partial(self._done, request.request_id, submitted))

    def _reasoning_gate(self, parser: str | None, prompt: list[int]) -> ReasoningGate | None:
        if parser is None:
            return None
        tokenizer = self._hf_tokenizer()
        start, end = (tokenizer.encode(m, add_special_tokens=False)
                      for m in REASONING_MARKERS[parser])  # fmt: skip
        return ReasoningGate(start, end, prompt)

    def wait(self, timeout: float) -> None:
        """Block until some compile ends (or `timeout` seconds): an engine with nothing to
        step but requests waiting on their grammars sleeps here rather than spinning."""
        self.ready.wait(timeout)
        self.ready.clear()

    def bitmask(self, requests: list) -> tuple[list[int], torch.Tensor] | None:
        """The rows (indices into `requests`) of requests constrained at this token and their
        allowed tokens as an int32 bitmask (rows, ceil(vocab / 32)); None when there are none
        (a request still reasoning, or whose grammar ended, is not)."""
        rows = [i for i, r in enumerate(requests) if r.grammar and r.grammar.constraining]
        if not rows:
            return None
        bitmask = torch.full((len(rows), (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        for j, i in enumerate(rows):
            requests[i].grammar.matcher.fill(bitmask, j)
        return rows, bitmask

    def spec_bitmask(self, requests: list, proposals: list[list[int]]):
        """As `bitmask`, for a verification step: request i's len(proposals[i]) + 1 rows in
        order, each row the mask of the state its grammar would have with the proposals
        before that position accepted (walked on a copy of the matcher). Rows past a proposal
        the grammar refuses, or past its end, stay unmasked: the rejection sampler never
        reaches them (the refused proposal's own row bans it)."""
        total = sum(len(d) + 1 for d in proposals)
        bitmask = torch.full((total, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        rows, first = [], 0
        for request, drafts in zip(requests, proposals):
            grammar = request.grammar
            if grammar and grammar.constraining:
                matcher = grammar.matcher.fork()
                for j in range(len(drafts) + 1):
                    matcher.fill(bitmask, first + j)
                    rows.append(first + j)
                    if j == len(drafts) or not matcher.accept(drafts[j]) or matcher.terminated:
                        break
            first += len(drafts) + 1
        return (rows, bitmask[rows]) if rows else None

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)  # a byte's bits


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set to -inf, in place, each listed row's logits of tokens its bitmask bans: the CPU
    kernel where it is built, else through torch (any device)."""
    if (
        logits.device.type == "cpu"
        and logits.dtype == torch.float32
        and logits.is_contiguous()
        and has_cpu_bitmask_kernel()
    ):
        cpu_kernels.apply_token_bitmask(logits, rows, bitmask.contiguous())
        return
    bitmask = bitmask.to(logits.device)
    bits = _BITS.to(logits.device)
    banned = bitmask.contiguous().view(torch.uint8).unsqueeze(-1).bitwise_and(bits).eq(0)
    banned = banned.view(bitmask.shape[0], -1)[:, : logits.shape[-1]]
    if rows.numel() == logits.shape[0] and torch.equal(rows.cpu(), torch.arange(rows.numel())):
        logits.masked_fill_(banned, float("-inf"))
    else:
        sub = logits.index_select(0, rows).masked_fill_(banned, float("-inf"))
        logits.index_copy_(0, rows, sub)


@functools.cache
def has_cpu_bitmask_kernel() -> bool:
    return load_cpu_kernels() and hasattr(torch.ops.tandem_cpu, "apply_token_bitmask")
