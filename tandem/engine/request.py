"""Request state, sampling parameters and outputs, with vLLM's names."""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field

from tandem.engine.pooling import PoolingParams
from tandem.engine.structured_output.params import StructuredOutputsParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = enum.auto()  # max_tokens or max_model_len
    FINISHED_ABORTED = enum.auto()
    HANDED_OFF = enum.auto()  # prefilled here, decoded elsewhere: done on this engine

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASON.get(self)


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.HANDED_OFF,
}
_FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


MAX_LOGPROBS = 20  # the most alternatives a request may ask for, as OpenAI allows
MAX_N = 128


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to sample a request's tokens, with vLLM's names and meanings. Invalid values
    raise ValueError naming the parameter (token ids are checked against the vocabulary by
    the engine, which knows it)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): no top-k
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop_token_ids are banned until this many tokens
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and the output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    allowed_token_ids: tuple[int, ...] | None = None  # only these may be sampled
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()  # sequences never completed
    logprobs: int | None = None  # the sampled token's logprob and this many alternatives
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    n: int = 1  # samples of the prompt, which is prefilled once (see Request.fork_ids)
    structured_outputs: StructuredOutputsParams | None = None  # a grammar the output follows
    pooling: PoolingParams | None = None  # a pooling request: its prompt pooled, no tokens

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in bias))
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        bad = tuple(tuple(w) for w in self.bad_words_token_ids)
        object.__setattr__(self, "bad_words_token_ids", bad)
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", ">= 1")
        _check(isinstance(self.n, int) and 1 <= self.n <= MAX_N, "n", f"in [1, {MAX_N}]")
        _check(_finite(self.temperature) and self.temperature >= 0, "temperature", ">= 0")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]")
        _check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", "-1 (off) or >= 0")
        _check(_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", ">= 0")
        _check(self.min_tokens <= self.max_tokens, "min_tokens", "<= max_tokens")
        _check(self.seed is None or isinstance(self.seed, int), "seed", "an integer")
        _check(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            "non-negative integers",
        )
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_finite(value) and -2 <= value <= 2, name, "in [-2, 2]")
        _check(
            _finite(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            "> 0",
        )
        _check(
            all(t >= 0 and math.isfinite(b) and -100 <= b <= 100 for t, b in self.logit_bias),
            "logit_bias",
            "token ids mapped to biases in [-100, 100]",
        )
        _check(
            self.allowed_token_ids is None
            or (
                len(self.allowed_token_ids) > 0
                and all(isinstance(t, int) and t >= 0 for t in self.allowed_token_ids)
            ),
            "allowed_token_ids",
            "a non-empty list of token ids",
        )
        _check(
            all(w and all(isinstance(t, int) and t >= 0 for t in w) for w in bad),
            "bad_words",
            "non-empty words",
        )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(
                value is None or (isinstance(value, int) and 0 <= value <= MAX_LOGPROBS),
                name,
                f"in [0, {MAX_LOGPROBS}]",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
        )

    def check_vocab(self, vocab_size: int) -> None:
        """ValueError naming the parameter when a token id it names is not in the vocab."""
        named = {
            "stop_token_ids": self.stop_token_ids,
            "logit_bias": [t for t, _ in self.logit_bias],
            "allowed_token_ids": self.allowed_token_ids or (),
            "bad_words": [t for w in self.bad_words_token_ids for t in w],
        }
        for name, ids in named.items():
            _check(all(t < vocab_size for t in ids), name, f"token ids in [0, {vocab_size})")


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check(ok: bool, param: str, expected: str) -> None:
    if not ok:
        raise ValueError(f"{param} must be {expected}")


def prefix_salt(cache_salt: str | None, lora_name: str | None) -> str | None:
    """The first block's salt: the same prompt under another adapter (or tenant) has other
    KV, so neither the prefix cache, the cluster's index nor routing may mix them."""
    if lora_name is None:
        return cache_salt
    return f"{cache_salt or ''}\x00lora:{lora_name}"


@dataclass(slots=True, eq=False)
class Request:
    """One generation request as the engine tracks it.

    `all_token_ids` holds the prompt followed by the output; `num_computed_tokens` counts
    the leading tokens whose KV is in the cache (or scheduled into it this step).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = 0.0
    priority: int = 0
    cache_salt: str | None = None
    lora_name: str | None = None  # the LoRA adapter it runs with (None: the base model)
    lora_path: str | None = None  # its PEFT folder, where a worker without it loads it from
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prompt tokens served from the prefix cache (-1: not yet)
    num_preemptions: int = 0
    block_hashes: list[int] = field(default_factory=list)
    stop_reason: int | str | None = None
    # prompt_logprobs asked for: one sampler.TokenLogprobs per prompt token after the first
    prompt_logprobs: list = field(default_factory=list)
    # n > 1: the ids of samples 2..n. The prompt is prefilled once; when it is done, each of
    # them forks off with its own first token, sharing the prompt's KV blocks.
    fork_ids: tuple[str, ...] = ()
    parent_id: str | None = None  # the request this one forked from
    # structured outputs: this engine's RequestGrammar (compiling, then a matcher); never
    # on the wire (the spec is, in sampling_params, and the receiver replays the tokens)
    grammar: object | None = None
    # pooling: the prompt runs in one step, none of it from the cache (pooling.py); and the
    # pooled output (float32 tensor) once the runner made it
    whole_prompt: bool = False
    pooled: object | None = None
    # speculative decoding: tokens proposed to follow, verified by the next step
    spec_token_ids: list[int] = field(default_factory=list)

    def fork(self, request_id: str, index: int) -> Request:
        """The `index`-th sample (1..n-1) of this request: its seed is seed + index, as in
        vLLM."""
        params = self.sampling_params
        if params.seed is not None:
            params = dataclasses.replace(params, seed=params.seed + index)
        return Request(
            request_id,
            self.prompt_token_ids,
            params,
            eos_token_id=self.eos_token_id,
            arrival_time=self.arrival_time,
            priority=self.priority,
            cache_salt=self.cache_salt,
            lora_name=self.lora_name,
            lora_path=self.lora_path,
            parent_id=self.request_id,
        )

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        self.all_token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def prefix_salt(self) -> str | None:
        """What separates its prefix-cache entries: the tenant's salt and the adapter."""
        return prefix_salt(self.cache_salt, self.lora_name)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)


@dataclass(slots=True)
class CompletionOutput:
    """One sequence's output so far: the new tokens of this step and the running totals."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list | None = None  # one sampler.TokenLogprobs per token, when asked for


@dataclass(slots=True)
class RequestOutput:
    """What the engine reports for a request after a step (delta or cumulative, as asked)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    prompt: str | None = None
    prompt_logprobs: list | None = None  # when asked for: None, then one per prompt token


@dataclass(slots=True)
class PoolingRequestOutput:
    """A pooling request's result: `data` is the pooled output (float32 tensor: an
    embedding, a classifier's scores; per token for ALL pooling)."""

    request_id: str
    prompt_token_ids: list[int]
    data: object
    num_cached_tokens: int = 0

    @property
    def embedding(self) -> list[float]:
        return self.data.tolist()
