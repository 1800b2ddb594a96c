"""OpenAI request bodies (with vLLM's extras) and the error shape."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tandem.engine.request import SamplingParams
from tandem.engine.structured_output.params import StructuredOutputsParams
from tandem.services.gateway.messages import ChatMessage, NamedToolChoice, Tool


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage so far on every chunk


class JsonSchemaFormat(BaseModel):
    """OpenAI's response_format.json_schema."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text, json_object, or json_schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(BaseModel):
    """vLLM's structured_outputs request object: exactly one constraint."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: str | dict[str, Any] | bool | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None

    def params(self) -> StructuredOutputsParams:
        """ValueError (naming structured_outputs) unless exactly one constraint is set."""

        def text(value):  # noqa: E306
            return value if value is None or isinstance(value, str) else json.dumps(value)

        return StructuredOutputsParams(
            json=text(self.json_),
            regex=self.regex,
            choice=None if self.choice is None else tuple(self.choice),
            grammar=self.grammar,
            json_object=bool(self.json_object),
            structural_tag=text(self.structural_tag),
        )


class GenerateRequest(BaseModel):
    """The sampling fields /v1/completions and /v1/chat/completions share (OpenAI's names
    and vLLM's extras). Strict, as OpenAI's API is: an unknown field or a value of the wrong
    JSON type (a number in a string, say) is a 400, not silently ignored or converted."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None  # refused, as vLLM V1 does
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    return_token_ids: bool = False
    logits_processors: Any = None  # per-request processors: refused, as vLLM V1 does
    priority: int = 0
    # printable, no spaces, bounded: every stage keys on it (the route's checks refuse others)
    request_id: str | None = Field(None, min_length=1, max_length=200, pattern=r"^[!-~]+$")
    cache_salt: str | None = None  # enters the first block's hash: tenants share no cache
    # structured outputs: OpenAI's response_format, or vLLM's structured_outputs
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None

    def structured_param(self) -> str:
        """The request field a structured output's constraint came from (for errors)."""
        return "structured_outputs" if self.structured_outputs is not None else "response_format"

    def structured_output_params(self) -> StructuredOutputsParams | None:
        """The constraint asked for, if any; ValueError naming the field when it is not
        one constraint (the spec itself is checked with a backend, by the gateway)."""
        fmt = self.response_format
        if fmt is not None and fmt.type == "text":
            fmt = None
        if fmt is not None and self.structured_outputs is not None:
            raise ValueError(
                "response_format must not be given with structured_outputs: one constraint"
            )
        if self.structured_outputs is not None:
            return self.structured_outputs.params()
        if fmt is None:
            return None
        if fmt.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise ValueError("response_format must have json_schema.schema for type json_schema")
        return StructuredOutputsParams(json=json.dumps(fmt.json_schema.schema_))

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        """How many alternatives per sampled token (None: no logprobs)."""
        return None

    def check(self) -> None:
        """What the engine cannot check: ValueError naming the parameter."""
        self._check_int_sizes()
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options must only be given with stream: true")
        if self.n < 1:
            raise ValueError("n must be >= 1")
        if self.n > 128:
            raise ValueError("n must be <= 128")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of must not be set: it is not supported (use n)")
        if self.logits_processors is not None:
            raise ValueError(
                "logits_processors must not be set per request: they are global "
                "(--logits-processors at start-up), as in vLLM V1"
            )
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise ValueError("truncate_prompt_tokens must be >= 1")
        for token in self.logit_bias or {}:
            try:
                int(token)
            except ValueError:
                raise ValueError("logit_bias must map token ids to biases") from None

    def _check_int_sizes(self) -> None:
        """Every integer fits the wire's field (32 bits; the seed 64): a larger one is the
        client's error, not an overflow somewhere inside."""
        for name, value in self:
            if name == "seed":
                bound = 1 << 63
            elif name == "prompt":
                continue  # token ids: checked against the vocabulary
            else:
                bound = 1 << 31
            values = value if isinstance(value, list) else [value]
            if isinstance(value, dict):
                values = [int(k) for k in value if k.lstrip("-").isdigit()]
            if any(isinstance(v, int) and not -bound <= v < bound for v in values):
                raise ValueError(f"{name} must be an integer in [{-bound}, {bound - 1}]")

    def sampling_params(
        self, default_max_tokens: int = 16, bad_words_token_ids=()
    ) -> SamplingParams:
        """The engine's parameters; ValueError (naming the parameter) when one is invalid."""
        self.check()
        stop = self.stop if self.stop is not None else ()
        max_tokens = self.requested_max_tokens()
        return SamplingParams(
            max_tokens=default_max_tokens if max_tokens is None else max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            seed=self.seed,
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias={int(t): b for t, b in (self.logit_bias or {}).items()},
            allowed_token_ids=self.allowed_token_ids,
            bad_words_token_ids=bad_words_token_ids,
            logprobs=self.num_logprobs(),
            prompt_logprobs=self.prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            n=self.n,
            structured_outputs=self.structured_output_params(),
        )


class CompletionRequest(GenerateRequest):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None  # alternatives per token, in the legacy completions shape
    echo: bool = False

    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def prompt_only(self) -> bool:
        """`max_tokens: 0` with `echo`: the prompt alone comes back (with its logprobs)."""
        return self.echo and self.max_tokens == 0

    def requested_max_tokens(self) -> int | None:
        return 1 if self.prompt_only else self.max_tokens  # its one token is dropped

    def sampling_params(
        self, default_max_tokens: int = 16, bad_words_token_ids=()
    ) -> SamplingParams:
        """With `echo` and `logprobs`, the prompt's logprobs too (as vLLM does)."""
        params = super().sampling_params(default_max_tokens, bad_words_token_ids)
        if self.echo and self.logprobs is not None:
            k = max(params.prompt_logprobs or 0, self.logprobs)
            params = dataclasses.replace(params, prompt_logprobs=k)
        return params

    def check(self) -> None:
        super().check()
        if self.prompt_only and self.stream:
            raise ValueError("max_tokens must be >= 1 when streaming (0 with echo: not streamed)")

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, (str, list)) and len(v) == 0:
            raise ValueError("prompt must not be empty")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (a batch gives one choice per prompt)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [p]
        return list(p)


def _messages_non_empty(v: list[ChatMessage] | None) -> list[ChatMessage] | None:
    if v is not None and len(v) == 0:
        raise ValueError("messages must not be empty")
    return v


class ChatCompletionRequest(GenerateRequest):
    """POST /v1/chat/completions. Without max_tokens, generation may fill the context."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # OpenAI's fields that change nothing here (kept, so clients that send them are served)
    metadata: dict[str, str] | None = None
    store: bool | None = None  # true (store the completion) is refused
    service_tier: str | None = None  # auto | default
    prompt_cache_key: str | None = None  # prefix caching here needs no hint
    safety_identifier: str | None = None
    modalities: list[str] | None = None  # ["text"]
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None  # to the template
    # vLLM's extras
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    continue_final_message: bool = False  # the reply continues the last (assistant) message
    documents: list[dict[str, str]] | None = None  # for templates that take documents (RAG)

    _check_messages = field_validator("messages")(_messages_non_empty)

    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def check(self) -> None:
        super().check()
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise ValueError("max_completion_tokens must not differ from max_tokens")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs must come with logprobs: true")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise ValueError("top_logprobs must be in [0, 20]")
        if self.store:
            raise ValueError("store must be false: stored completions are not supported")
        if self.service_tier not in (None, "auto", "default"):
            raise ValueError("service_tier must be auto or default")
        if self.modalities is not None and set(self.modalities) != {"text"}:
            raise ValueError('modalities must be ["text"]: only text output is supported')
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError(
                "continue_final_message must not be set with add_generation_prompt: true"
            )

    def template_kwargs(self) -> dict | None:
        """What the chat template gets besides the messages and the tools."""
        effort = self.reasoning_effort
        kwargs = ({} if effort is None else {"reasoning_effort": effort}) | dict(
            self.chat_template_kwargs or {}
        )
        if self.continue_final_message:
            kwargs["continue_final_message"] = True
        if self.documents is not None:
            kwargs["documents"] = self.documents
        return kwargs or None

    def template_messages(self) -> list[dict]:
        return [m.to_template() for m in self.messages]

    def sampling_params(
        self, default_max_tokens: int = 16, bad_words_token_ids=()
    ) -> SamplingParams:
        try:
            return super().sampling_params(default_max_tokens, bad_words_token_ids)
        except ValueError as e:
            if self.max_completion_tokens is not None and str(e).startswith("max_tokens "):
                raise ValueError(f"max_completion_tokens{str(e)[len('max_tokens') :]}") from None
            raise


class TokenizeRequest(BaseModel):
    """POST /tokenize: a prompt, or chat messages rendered with the chat template."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # for a prompt; the chat template places its own
    add_generation_prompt: bool = True  # for messages

    _check_messages = field_validator("messages")(_messages_non_empty)


class LoadLoRAAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(BaseModel):
    """POST /v1/unload_lora_adapter (vLLM's)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


class DetokenizeRequest(BaseModel):
    """POST /detokenize."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[int]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tandem"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)
