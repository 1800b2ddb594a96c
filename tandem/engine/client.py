"""What a caller (the gateway) sees of an engine: submit a request in the API's terms,
stream outputs, abort; and the shapes of what goes in and comes back. Torch-free: a process
that only holds a client never loads it.

Two clients speak it: `inproc_client.InProcessEngineClient` runs an EngineCore on a thread of
the caller's own process (the colocated deployment); the gateway's cluster client speaks it
over the stages.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from tandem.engine.request import SamplingParams

logger = logging.getLogger(__name__)
RETRY_AFTER_S = 1  # what a refused client is told to wait before trying again


class EngineOverloaded(RuntimeError):
    """The engine refused a request for now (HTTP 503 with Retry-After): its queue is at a
    bound, or no worker is there to run it."""


class InvalidRequest(ValueError):
    """The request cannot run (HTTP 400); `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class GenerateInput:
    """A generation request in the API's terms, before anything is tokenized: the engine
    side renders, tokenizes and checks it (`engine.preprocess`), in the tokenizer stage of
    the cluster or in-process when colocated.

    Completions give `prompts` (texts or token ids; pooling requests also text pairs, as
    tuples, for cross-encoders), chat gives `messages`. Prompt i's
    samples are `request_ids[i * n : (i + 1) * n]`. `params` comes from the body; with
    `fill_context` (no max_tokens given) the reply may fill the rest of the context."""

    request_ids: list[str]
    params: SamplingParams
    prompts: list[str | tuple[str, str] | list[int]] = field(default_factory=list)
    messages: list[dict] | None = None
    add_generation_prompt: bool = True
    tools: list[dict] | None = None  # chat: the tools, as the chat template takes them
    chat_template_kwargs: dict | None = None  # chat: more variables for the template
    truncate_prompt_tokens: int | None = None
    bad_words: list[str] = field(default_factory=list)
    fill_context: bool = False
    return_prompt_text: bool = False  # echo: each prompt's text comes back
    priority: int = 0
    cache_salt: str | None = None
    lora_name: str | None = None  # the LoRA adapter named as the request's model
    lora_path: str | None = None  # its PEFT folder
    trace_context: dict[str, str] | None = None
    arrival_time: float = 0.0

    @property
    def num_prompts(self) -> int:
        return 1 if self.messages is not None else len(self.prompts)

    @property
    def n(self) -> int:
        return len(self.request_ids) // max(self.num_prompts, 1)

    def ids_of(self, index: int) -> list[str]:
        """The request ids of prompt `index`'s samples (the first carries the prompt)."""
        return self.request_ids[index * self.n : (index + 1) * self.n]


@dataclass(slots=True)
class PreparedPrompt:
    """One prompt as it went to the engine: its token ids, and its text when asked for."""

    token_ids: list[int]
    text: str = ""


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
    pooled: list | None = None  # a pooling request's output: floats (or rows of them for ALL)


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

    async def submit(
        self, inputs: GenerateInput
    ) -> tuple[list[PreparedPrompt], list[AsyncIterator[GenerationChunk]]]:
        """Run a request: its prompts as they went in, and one stream per request id (in
        `inputs.request_ids` order). Each prompt is prefilled once, then forked into its n
        samples. InvalidRequest when it cannot run, EngineOverloaded when not now.
        `inputs.trace_context` (W3C) makes the engine's spans part of the caller's trace."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (on every worker, and in the cluster's index)."""
        ...

    async def update_lora(self, name: str, path: str | None) -> None:
        """A LoRA adapter loaded (`path`) or unloaded (None) at run time, on every worker."""
        ...

    async def shutdown(self) -> None: ...


def check_ids_free(request_ids: list[str], in_flight) -> None:
    """InvalidRequest when a request id is taken by a request in flight (a client's own id,
    sent twice): every stage keys on it."""
    for request_id in request_ids:
        if request_id in in_flight:
            raise InvalidRequest(
                f"request_id must not be in use by a request in flight: {request_id!r}",
                "request_id",
            )
