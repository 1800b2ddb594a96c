"""What every route of the gateway shares: its state, and the checks and preparation of a
generation request (readiness, model, sampling parameters, prompt, fan-out into streams)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tandem.engine.client import EngineClient, GenerationChunk
from tandem.engine.request import SamplingParams
from tandem.services.gateway.protocol import GenerateRequest
from tandem.services.gateway.streaming import APIError, Choice, param_of
from tandem.services.gateway.telemetry import ApiRequest, Telemetry


@dataclass(frozen=True, slots=True)
class GatewayState:
    """The gateway's parts, set once by `build_app`: the engine client, telemetry, the name
    and path of the model served, when it was listed as created, and the guard's settings.
    Its methods raise APIError (OpenAI's error shape) for what a client got wrong."""

    client: EngineClient
    telemetry: Telemetry
    served_model_name: str
    model_path: str
    created: int  # unix time, as /v1/models lists it
    api_key: str | None
    max_body_bytes: int

    def check_ready(self) -> None:
        if not self.client.ready:
            raise APIError(503, "the engine is still starting", "ServiceUnavailableError")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise APIError(
                404,
                f"The model `{model}` does not exist.",
                "NotFoundError",
                "model",
                "model_not_found",
            )

    def check_request(self, body: GenerateRequest) -> None:
        """What a generation request must pass before anything is tokenized."""
        self.check_ready()
        self.check_model(body.model)
        if body.cache_salt is not None and not body.cache_salt:
            raise APIError(
                400, "cache_salt must be a non-empty string", "BadRequestError", "cache_salt"
            )

    def sampling_params(
        self,
        body: GenerateRequest,
        default_max_tokens: int = 16,
        bad_words: tuple[tuple[int, ...], ...] = (),
    ) -> SamplingParams:
        try:
            params = body.sampling_params(default_max_tokens, bad_words)
            params.check_vocab(self.client.vocab_size)
            return params
        except ValueError as e:
            raise APIError(400, str(e), "BadRequestError", param_of(str(e))) from None

    async def bad_words_ids(self, words: list[str] | None) -> tuple[tuple[int, ...], ...]:
        """Each bad word as token sequences, alone and after a space (as vLLM does)."""
        out: list[tuple[int, ...]] = []
        for word in words or ():
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = tuple(await self.client.encode(text, add_special_tokens=False))
                if ids and ids not in out:
                    out.append(ids)
        return tuple(out)

    async def chat_prompt(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        try:
            return await self.client.apply_chat_template(messages, add_generation_prompt)
        except ValueError as e:
            raise APIError(400, str(e), "BadRequestError", "messages") from None

    def check_token_ids(self, ids: list[int], param: str, name: str | None = None) -> None:
        """Every id is in the vocabulary; the message calls them `name` (default: param)."""
        if any(not 0 <= t < self.client.vocab_size for t in ids):
            raise APIError(
                400,
                f"{name or param} must be in [0, {self.client.vocab_size})",
                "BadRequestError",
                param,
            )

    def check_prompt(self, ids: list[int], param: str) -> None:
        """A prompt is not empty, holds only known token ids and leaves room for a token."""
        if not ids:
            raise APIError(400, f"{param} must not be empty", "BadRequestError", param)
        self.check_token_ids(ids, param, f"{param} token ids")
        max_model_len = self.client.max_model_len
        if len(ids) >= max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {max_model_len} tokens; "
                f"the prompt has {len(ids)} tokens and at least one must be generated.",
                "BadRequestError",
                param,
            )

    def fan_out(
        self,
        api: ApiRequest,
        base_id: str,
        prompts: list[list[int]],
        params: SamplingParams,
        body: GenerateRequest,
        prefixes: list[str] | None = None,
    ) -> tuple[list[AsyncIterator[GenerationChunk]], list[Choice]]:
        """`n` samples per prompt, prefilled once (choice index = prompt * n + j; a seeded
        request's j-th sample uses seed + j, as vLLM does): watched streams and choices."""
        # A client's own request_id may come again (while the first runs, or soon after,
        # when the stages still remember it): the engine's ids get a suffix of their own.
        if body.request_id is not None:
            base_id = f"{base_id}-{uuid.uuid4().hex[:8]}"
        streams, choices = [], []
        for i, ids in enumerate(prompts):
            rids = [f"{base_id}-{i * body.n + j}" for j in range(body.n)]
            try:
                gens = self.client.generate_many(
                    rids, ids, params, body.priority, body.cache_salt, api.trace_context
                )
            except ValueError as e:
                raise APIError(400, str(e), "BadRequestError", param_of(str(e))) from None
            for j, (rid, gen) in enumerate(zip(rids, gens)):
                streams.append(api.watch(rid, len(ids), gen))
                prompt_ids = ids if body.return_token_ids else None
                choice = Choice(i * body.n + j, prefixes[i] if prefixes else "", prompt_ids)
                choice.wants_prompt_logprobs = params.prompt_logprobs is not None
                choices.append(choice)
        return streams, choices


def truncated(ids: list[int], body: GenerateRequest) -> list[int]:
    """The prompt's last `truncate_prompt_tokens` ids (all of them when not set)."""
    k = body.truncate_prompt_tokens
    return ids[-k:] if k is not None else ids
