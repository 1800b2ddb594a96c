"""vLLM V1's unified token-budget scheduler. Pure Python; the clock is injected.

Each step hands out at most `max_num_batched_tokens` tokens, running requests first, then
waiting ones. A request is just "tokens computed so far" against "tokens it has", so prefill,
chunked prefill, decode and recompute after preemption are one mechanism.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tandem.engine.config import SchedulerConfig, SchedulingPolicy
from tandem.engine.kv_cache_manager import KVCacheManager
from tandem.engine.request import Request, RequestStatus


@dataclass(slots=True)
class SchedulerOutput:
    """One step's plan: tokens per request (in batch order) and their block tables."""

    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    failed_ids: list[str] = field(default_factory=list)  # plan entries that did not fit
    deferred_ids: list[str] = field(default_factory=list)  # short of their last token (grammar)
    # speculative decoding: the proposals each decode verifies this step (after its token)
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


class WaitingQueue:
    """FCFS (a deque) or priority (a heap on (priority, arrival, seq)); preempted requests
    return to the front under FCFS and to their own place under priority."""

    def __init__(self, policy: SchedulingPolicy) -> None:
        self.policy = policy
        self._fifo: deque[Request] = deque()
        self._heap: list[tuple[int, float, int, Request]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._fifo) + len(self._heap)

    def __iter__(self):
        if self.policy is SchedulingPolicy.FCFS:
            return iter(self._fifo)
        return (entry[-1] for entry in sorted(self._heap))

    def add(self, request: Request, front: bool = False) -> None:
        if self.policy is SchedulingPolicy.PRIORITY:
            key = (request.priority, request.arrival_time, next(self._seq), request)
            heapq.heappush(self._heap, key)
        elif front:
            self._fifo.appendleft(request)
        else:
            self._fifo.append(request)

    def peek(self) -> Request:
        return self._fifo[0] if self.policy is SchedulingPolicy.FCFS else self._heap[0][-1]

    def pop(self) -> Request:
        if self.policy is SchedulingPolicy.FCFS:
            return self._fifo.popleft()
        return heapq.heappop(self._heap)[-1]

    def remove(self, request: Request) -> None:
        if self.policy is SchedulingPolicy.FCFS:
            self._fifo.remove(request)
        else:
            self._heap = [e for e in self._heap if e[-1] is not request]
            heapq.heapify(self._heap)


class Scheduler:
    """Decides, step by step, which requests compute how many tokens."""

    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        max_model_len: int,
        clock: Callable[[], float] = time.monotonic,
        max_loras: int | None = None,
    ) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.clock = clock
        self.max_loras = max_loras  # distinct LoRA adapters running at once (None: no LoRA)
        self.waiting = WaitingQueue(config.policy)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request_id {request.request_id!r}")
        pooling = request.sampling_params.pooling is not None  # generates no token
        if request.num_prompt_tokens >= self.max_model_len + pooling:
            raise ValueError(
                f"prompt has {request.num_prompt_tokens} tokens; max_model_len is "
                f"{self.max_model_len} and at least one token must be generated"
            )
        request.arrival_time = request.arrival_time or self.clock()
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def add_computed_request(
        self, request: Request, num_computed_tokens: int, cached_blocks: list = ()
    ) -> bool:
        """Admit a request whose first `num_computed_tokens` tokens have their KV computed
        elsewhere (a prefill worker) straight into running; its leading `cached_blocks`
        (prefix-cache hits here) hold part of it already. False, changing nothing, when it
        would exceed max_num_seqs or its blocks do not fit; on True the caller writes the
        rest of the KV into the request's blocks before the next step."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request_id {request.request_id!r}")
        if not 0 < num_computed_tokens < request.num_tokens:
            raise ValueError("num_computed_tokens must leave at least one token to compute")
        if len(self.running) >= self.config.max_num_seqs or not self._lora_fits(request):
            return False
        request.num_computed_tokens = 0
        num_new = num_computed_tokens - len(cached_blocks) * self.kv.block_size
        if self.kv.allocate_slots(request, num_new, cached_blocks) is None:
            return False
        request.num_computed_tokens = num_computed_tokens
        request.arrival_time = request.arrival_time or self.clock()
        request.status = RequestStatus.RUNNING
        self.requests[request.request_id] = request
        self.running.append(request)
        return True

    @property
    def has_unfinished(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        # 1. Running requests first, in order: decode tokens and unfinished prefill chunks.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(self._computable(request) - request.num_computed_tokens, budget)
            if num_new <= 0:
                i += 1
                continue
            spec = self._spec_tokens(request, num_new, budget)
            if spec and self.kv.allocate_slots(request, 1 + len(spec)) is not None:
                self._schedule(request, 1 + len(spec), out)  # proposals never preempt
                out.spec_token_ids[request.request_id] = spec
                budget -= 1 + len(spec)
                i += 1
                continue
            while self.kv.allocate_slots(request, num_new) is None:
                victim = self._pick_victim()
                if self.running.index(victim) < i:
                    i -= 1  # an already scheduled request leaves the list before this one
                budget += out.num_scheduled_tokens.get(victim.request_id, 0)
                self._preempt(victim, out)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted itself; running[i] is now the next request
            self._schedule(request, num_new, out)
            budget -= num_new
            i += 1

        # 2. Waiting requests, unless this step already had to preempt. One whose LoRA
        # adapter would be one too many (--max-loras) waits; those behind it go on.
        skipped, loras = [], self._running_loras()
        while not out.preempted_ids and len(self.waiting) and budget > 0:
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting.peek()
            if not self._lora_fits(request, loras):
                skipped.append(self.waiting.pop())
                continue
            hits, num_hit_tokens = self._cache_hits(request)
            num_new = self._computable(request) - num_hit_tokens
            whole = request.whole_prompt or not self.config.enable_chunked_prefill
            if whole and num_new > budget:
                break
            num_new = min(num_new, budget)
            if self.kv.allocate_slots(request, num_new, hits) is None:
                break
            self.waiting.pop()
            if request.lora_name is not None:
                loras.add(request.lora_name)
            self._start_running(request, num_hit_tokens)
            if num_new > 0:  # 0: all it can compute before its grammar is cached
                self._schedule(request, num_new, out)
            budget -= num_new
        for request in reversed(skipped):
            self.waiting.add(request, front=True)
        return out

    def _running_loras(self) -> set[str]:
        return {r.lora_name for r in self.running if r.lora_name is not None}

    def _lora_fits(self, request: Request, running: set[str] | None = None) -> bool:
        """Whether running it keeps the distinct adapters running (`running`, else counted
        now) within max_loras."""
        name = request.lora_name
        if name is None or self.max_loras is None:
            return True
        running = self._running_loras() if running is None else running
        return name in running or len(running) < self.max_loras

    def _spec_tokens(self, request: Request, num_new: int, budget: int) -> list[int]:
        """The proposals a decode verifies this step: within the budget, the context length
        and the tokens it may still output (the step outputs up to one more)."""
        if not request.spec_token_ids or num_new != 1 or request.num_output_tokens == 0:
            return []
        room = min(
            budget - 1,
            self.max_model_len - request.num_tokens,
            request.sampling_params.max_tokens - request.num_output_tokens - 1,
        )
        return request.spec_token_ids[: max(room, 0)]

    def _cache_hits(self, request: Request) -> tuple[list, int]:
        """Its leading blocks found in the prefix cache; none for a pooling request that
        needs every row of its prompt computed (pooling.py)."""
        if request.whole_prompt:
            return [], 0
        return self.kv.get_computed_blocks(request)

    def _computable(self, request: Request) -> int:
        """How many of its tokens a request may have computed after this step: all, but
        the one it samples from while its structured-output grammar compiles."""
        grammar = request.grammar
        if grammar is not None and not grammar.is_ready():
            return request.num_tokens - 1
        return request.num_tokens

    def _start_running(self, request: Request, num_hit_tokens: int) -> None:
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_hit_tokens
        request.num_computed_tokens = num_hit_tokens
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def schedule_plan(self, plan: dict[str, int]) -> SchedulerOutput:
        """Run a plan made elsewhere (the central scheduler's, on a prefill worker):
        `{request_id: num_tokens}` over requests already added. New requests reuse local
        prefix-cache hits first, so they may compute fewer tokens than planned. A request
        whose blocks do not fit is taken out (freed) and listed in `failed_ids` for the
        planner to re-queue; nothing is preempted. One whose grammar still compiles stops
        short of its last token and is listed in `deferred_ids`: the caller runs the rest
        when the grammar is ready."""
        out = SchedulerOutput()
        for request_id, num_tokens in plan.items():
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue  # aborted since the plan was made
            hits: list = []
            if request.status is not RequestStatus.RUNNING:
                hits, num_hit_tokens = self._cache_hits(request)
                request.num_computed_tokens = 0
            else:
                num_hit_tokens = request.num_computed_tokens
            remaining = request.num_tokens - num_hit_tokens
            num_new = min(num_tokens, remaining)
            deferred = num_new > 0 and num_new > self._computable(request) - num_hit_tokens
            if deferred:
                num_new = self._computable(request) - num_hit_tokens
                out.deferred_ids.append(request_id)
            if (num_new <= 0 and not deferred) or self.kv.allocate_slots(
                request, num_new, hits
            ) is None:
                self.finish(request, RequestStatus.FINISHED_ABORTED)
                out.failed_ids.append(request_id)
                continue
            if request.status is not RequestStatus.RUNNING:
                self.waiting.remove(request)
                self._start_running(request, num_hit_tokens)
            if num_new > 0:
                self._schedule(request, num_new, out)
        return out

    def _schedule(self, request: Request, num_new: int, out: SchedulerOutput) -> None:
        out.num_scheduled_tokens[request.request_id] = num_new
        out.requests.append(request)

    def _pick_victim(self) -> Request:
        if self.config.policy is SchedulingPolicy.PRIORITY:
            # Least urgent (highest priority value), latest arrival among those.
            return max(self.running, key=lambda r: (r.priority, r.arrival_time))
        return self.running[-1]

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Preempt by recompute: free its blocks; it keeps its tokens and starts over."""
        self.running.remove(request)
        if request.request_id in out.num_scheduled_tokens:
            del out.num_scheduled_tokens[request.request_id]
            out.requests.remove(request)
        self._requeue_preempted(request)
        out.preempted_ids.append(request.request_id)

    def _requeue_preempted(self, request: Request) -> None:
        """Free a request's blocks; it keeps its tokens and waits to start over."""
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add(request, front=True)

    def preempt_all(self) -> None:
        """Preempt every running request (a worker that stops hands its work back); those
        waiting to start (a decode worker's own prefills) are marked so as well."""
        for request in list(self.running):
            self.running.remove(request)
            self._requeue_preempted(request)
        for request in self.waiting:
            request.status = RequestStatus.PREEMPTED

    def take_preempted(self) -> list[Request]:
        """Remove the preempted requests (their blocks are already free) and return them: a
        decode worker sends them back to the central scheduler instead of recomputing here."""
        taken = [r for r in self.waiting if r.status is RequestStatus.PREEMPTED]
        for request in taken:
            self.waiting.remove(request)
            del self.requests[request.request_id]
        return taken

    def update_from_output(
        self, out: SchedulerOutput, sampled_token_ids: Iterable[int | list[int] | None]
    ) -> list[Request]:
        """Advance every scheduled request by its tokens; append sampled tokens of those that
        reached the end of their tokens; return the requests that finished this step. A
        decode that verified proposals has a list: the accepted ones, then one more; the KV
        of the rejected ones is dropped (its slots, and blocks that only they used)."""
        finished = []
        for request, sampled in zip(out.requests, sampled_token_ids, strict=True):
            if request.is_finished:
                continue  # aborted while the step ran
            tokens = sampled if isinstance(sampled, list) else [sampled]
            num_scheduled = out.num_scheduled_tokens[request.request_id]
            if request.request_id in out.spec_token_ids:
                num_scheduled = len(tokens)  # the last token and the accepted proposals
            request.num_computed_tokens += num_scheduled
            if request.num_computed_tokens < request.num_tokens or tokens[0] is None:
                continue  # a prefill chunk: its sample is not a token yet
            for token_id in tokens:
                if request.grammar is not None:  # before check_stop: it may end the grammar
                    request.grammar.accept(token_id)
                request.append_output_token(token_id)
                status = self.check_stop(request, token_id)
                if status is not None:
                    self.finish(request, status)
                    finished.append(request)
                    break
            if request.request_id in out.spec_token_ids and not request.is_finished:
                request.num_computed_tokens = request.num_tokens - 1
                self.kv.trim(request, request.num_tokens)
        return finished

    def check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        """Whether `token_id`, just appended, ends the request (and how)."""
        params = request.sampling_params
        if request.grammar is not None and request.grammar.terminated:
            return RequestStatus.FINISHED_STOPPED  # its grammar ended (or refused the token)
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id == request.eos_token_id:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request (stop, length or abort) and free its blocks."""
        if request.is_finished:
            return
        if request in self.running:
            self.running.remove(request)
        elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(request)
        request.status = status
        self.kv.free(request)
        self.requests.pop(request.request_id, None)

    def abort(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is not None:
            self.finish(request, RequestStatus.FINISHED_ABORTED)
        return request
