"""What the central scheduler's core speaks of: workers as their heartbeats describe them,
requests waiting or placed, and the plans it makes. Pure data."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field


class Overloaded(Exception):
    """A request refused for now (HTTP 503 with Retry-After): the queue is full or no worker
    of a role is there to take it."""


class Router(enum.Enum):
    ROUND_ROBIN = "round-robin"
    LEAST_LOADED = "least-loaded"
    KV_AWARE = "kv-aware"


class Role(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(slots=True)
class KVLayout:
    """KV blocks move between any two workers, so all hold them alike: the first worker to
    join an empty cluster sets the layout (block size, element type; the type once one says
    it), and a worker that differs from it is refused. The layout is never set by the
    outlier, so no stray heartbeat can lock the cluster's own workers out."""

    block_size: int | None = None
    dtype: str = ""

    def check(self, worker_id: str, block_size, kv_cache_dtype, has_workers: bool) -> str | None:
        """Why the worker is refused, or None (then the layout learns from it)."""
        if block_size is None:
            return None
        if self.block_size is None or not has_workers:
            self.block_size, self.dtype = block_size, kv_cache_dtype or ""
            return None
        size, dtype = self.block_size, self.dtype
        if block_size == size and (not kv_cache_dtype or not dtype or kv_cache_dtype == dtype):
            self.dtype = dtype or kv_cache_dtype or ""
            return None
        return (f"worker {worker_id} refused: its KV blocks are {block_size} tokens in "
                f"{kv_cache_dtype or '?'}, the cluster's {size} tokens in {dtype or '?'}; start "
                "every worker with the same --block-size and --kv-cache-dtype")  # fmt: skip


@dataclass(slots=True)
class WorkerState:
    """A worker as its last heartbeat describes it, plus what was sent to it since."""

    worker_id: str
    role: Role
    num_blocks: int = 0
    num_free_blocks: int = 0
    num_running: int = 0
    num_waiting: int = 0
    block_size: int = 16
    max_num_seqs: int = 1
    max_model_len: int = 0
    max_num_batched_tokens: int = 0
    vocab_size: int = 0
    kv_cache_dtype: str = ""  # its blocks' element type: one per cluster, as the block size
    lora_adapters: frozenset[str] = frozenset()  # LoRA adapters in its memory
    last_seen: float = 0.0
    draining: bool = False  # leaving: placed no new requests, finishes what it has
    plans_in_flight: int = 0  # prefill: plans sent and not yet reported
    last_plan_at: float = 0.0
    in_transit: dict[str, tuple[int, float]] = field(default_factory=dict)  # decode: id -> blocks


@dataclass(slots=True, eq=False)
class PendingRequest:
    """A request as the central scheduler sees it. `payload` is the shell's (its wire spec)."""

    request_id: str
    num_tokens: int  # prompt plus tokens generated before a preemption
    priority: int
    arrival_time: float
    payload: object
    token_ids: Sequence[int] = ()  # prompt and output so far, for the door's vocabulary check
    prefill_worker_id: str = ""
    decode_worker_id: str = ""
    num_planned: int = 0
    overlap: dict[str, int] = field(default_factory=dict)  # worker -> leading blocks cached
    cached_blocks: int = 0  # leading blocks its prefill worker was expected to hold, as placed
    block_hashes: list[int] = field(default_factory=list)  # its full blocks' chained hashes
    refused_by: set[str] = field(default_factory=set)  # prefill workers that could not run it
    placed_step: int = -1  # the step id of the plan with its first chunk
    pooling: bool = False  # prefill only: no decode worker; its prompt planned whole if it fits
    lora_name: str = ""  # its LoRA adapter ("": the base model)


@dataclass(slots=True)
class PlannedChunk:
    request: PendingRequest
    num_tokens: int
    is_first: bool  # the worker learns the request from its first chunk


@dataclass(slots=True)
class Plan:
    worker_id: str
    step_id: int
    chunks: list[PlannedChunk]


LORA_RESIDENT_BLOCKS = 4  # kv-aware: holding a request's LoRA adapter counts as so many blocks


def route(
    router: Router,
    turns: Iterator[int],
    request: PendingRequest,
    candidates: list[WorkerState],
    load: Callable[[WorkerState], int],
    overlap: Callable[[WorkerState], int],
    overlap_weight: float,
) -> WorkerState | None:
    """Pick among candidates by the router: round-robin (the next of `turns`), least load,
    or cached overlap (in tokens, times `overlap_weight`) minus load."""
    if not candidates:
        return None
    if router is Router.ROUND_ROBIN:
        return candidates[next(turns) % len(candidates)]

    def resident(worker: WorkerState) -> bool:  # its adapter is loaded there already
        return bool(request.lora_name) and request.lora_name in worker.lora_adapters

    if router is Router.LEAST_LOADED:
        return min(candidates, key=lambda w: (load(w), not resident(w)))

    def score(worker: WorkerState) -> float:
        tokens = overlap(worker)
        if resident(worker):  # loading an adapter costs about a few blocks' prefill
            tokens += LORA_RESIDENT_BLOCKS * worker.block_size
        return overlap_weight * tokens - load(worker)

    return max(candidates, key=score)
