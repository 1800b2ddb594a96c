"""What a caller (the gateway) sees of an engine: submit, stream outputs, abort; and the
shapes of what comes back. Torch-free: a process that only holds a client never loads it.

Two clients speak it: `inproc_client.InProcessEngineClient` runs an EngineCore on a thread of
the caller's own process (the colocated deployment); the gateway's cluster client speaks it
over the stages.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from tandem.engine.request import SamplingParams

logger = logging.getLogger(__name__)
RETRY_AFTER_S = 1  # what a refused client is told to wait before trying again


class EngineOverloaded(RuntimeError):
    """The engine refused a request for now (HTTP 503 with Retry-After): its queue is at a
    bound, or no worker is there to run it."""


@dataclass(slots=True)
class LogprobEntry:
    """One generated token's logprob with its text, and the top alternatives
    (token id, text, logprob), most likely first."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]
    rank: int = 0


def logprob_entries(tokenizer, logprobs) -> list[LogprobEntry] | None:
    """Engine TokenLogprobs (or their messages) with each token's text looked up."""
    if not logprobs:
        return None
    from tandem.engine.tokenizer import token_texts

    out = []
    for lp in logprobs:
        texts = token_texts(tokenizer, [lp.token_id, *lp.top_ids])
        top = list(zip(lp.top_ids, texts[1:], lp.top_logprobs))
        out.append(LogprobEntry(lp.token_id, texts[0], lp.logprob, top, lp.rank))
    return out


@dataclass(slots=True)
class GenerationChunk:
    """What a request produced since the last chunk."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    produced_at: float = 0.0  # wall clock of the step that made the tokens (0: unknown)
    logprobs: list[LogprobEntry] | None = None  # one per token, when asked for
    prompt_logprobs: list[LogprobEntry] | None = None  # with the first token, when asked for


class EngineClient(Protocol):
    """What the gateway needs from an engine, wherever it runs."""

    max_model_len: int
    vocab_size: int

    @property
    def ready(self) -> bool: ...

    def stats(self) -> dict: ...

    def metrics(self) -> list[str]:
        """The engine side's metrics, as Prometheus text expositions (one per process)."""
        ...

    async def start(self) -> None:
        """Connect to the engine (called once at start-up, retried until it succeeds)."""
        ...

    async def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]: ...

    async def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True
    ) -> list[int]:
        """The prompt token ids of chat messages. ValueError ("messages must ...") when they
        cannot be rendered."""
        ...

    async def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
        trace_context: dict[str, str] | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        """Run a request; `trace_context` (W3C) makes the engine's spans part of the
        caller's trace."""
        ...

    def generate_many(
        self,
        request_ids: list[str],
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
        trace_context: dict[str, str] | None = None,
    ) -> list[AsyncIterator[GenerationChunk]]:
        """`len(request_ids)` samples of one prompt (n > 1), prefilled once then forked:
        one stream each."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (on every worker, and in the cluster's index)."""
        ...

    async def shutdown(self) -> None: ...


class GenerateOne:
    """`generate` as the one-sample case of `generate_many` (both clients)."""

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
        trace_context: dict[str, str] | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        return self.generate_many(
            [request_id], prompt_token_ids, params, priority, cache_salt, trace_context
        )[0]


def check_ids_free(request_ids: list[str], in_flight) -> None:
    """ValueError when a request id is taken by a request in flight (a client's own id, sent
    twice): every stage keys on it."""
    for request_id in request_ids:
        if request_id in in_flight:
            raise ValueError(
                f"request_id must not be in use by a request in flight: {request_id!r}"
            )
