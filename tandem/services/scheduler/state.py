"""What the central scheduler's core speaks of: workers as their heartbeats describe them,
requests waiting or placed, and the plans it makes. Pure data."""

from __future__ import annotations

import enum
from collections.abc import Sequence
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
