"""What every route of the gateway shares: its state, and the checks and submission of a
generation request (readiness, model, the body's sampling parameters and structured-output
spec, fan-out into streams). Rendering, tokenizing and the checks that need token counts
are the engine side's (`engine.preprocess`): the gateway keeps HTTP."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tandem.engine.client import EngineClient, GenerateInput, GenerationChunk, InvalidRequest
from tandem.engine.request import SamplingParams
from tandem.engine.structured_output import backends
from tandem.engine.structured_output.params import StructuredOutputsConfig
from tandem.services.gateway.protocol import ChatCompletionRequest, GenerateRequest
from tandem.services.gateway.streaming import (
    APIError,
    Choice,
    UsageOptions,
    engine_error,
    param_of,
)
from tandem.services.gateway.telemetry import ApiRequest, Telemetry
from tandem.services.gateway.tools import ToolChoiceError, parameters_of, plan_tools

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GatewayState:
    """The gateway's parts, set once by `build_app`: the engine client, telemetry, the names
    and path of the model served, when it was listed as created, and whether requests are
    logged. Its methods raise APIError (OpenAI's error shape) for what a client got wrong."""

    client: EngineClient
    telemetry: Telemetry
    served_model_names: tuple[str, ...]  # the first names the model in responses
    model_path: str
    created: int  # unix time, as /v1/models lists it
    log_requests: bool = False
    max_log_len: int | None = None  # of a logged prompt: characters and token ids
    structured_outputs: StructuredOutputsConfig = StructuredOutputsConfig()
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    enable_prompt_tokens_details: bool = False
    runner: str = "generate"  # or pooling (the model folder's kind, engine.pooling)
    classifier: tuple[str, ...] | None = None  # a classification model's labels
    hidden_size: int | None = None  # a pooling model's embedding size
    # LoRA (--enable-lora): adapter name -> PEFT folder, changed by runtime loads
    enable_lora: bool = False
    loras: dict[str, str] = dataclasses.field(default_factory=dict)
    max_lora_rank: int = 16
    allow_runtime_lora_updating: bool = False

    @property
    def served_model_name(self) -> str:
        return self.served_model_names[0]

    def check_ready(self) -> None:
        if not self.client.ready:
            raise APIError(503, "the engine is still starting", "ServiceUnavailableError")

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_model_names and model not in self.loras:
            raise APIError(
                404,
                f"The model `{model}` does not exist.",
                "NotFoundError",
                "model",
                "model_not_found",
            )

    def model_name(self, model: str | None) -> str:
        """The name responses carry: the adapter asked for, else the served model's."""
        return model if model in self.loras else self.served_model_name

    def check_request(self, body: GenerateRequest) -> None:
        """What a generation request must pass before anything is tokenized."""
        self.check_ready()
        self.check_model(body.model)
        if self.runner == "pooling":
            raise APIError(400, "this model is a pooling model: it serves /v1/embeddings, "
                           "/pooling, /score, /rerank and /classify, not generation",
                           "BadRequestError", "model")  # fmt: skip
        if body.cache_salt is not None and not body.cache_salt:
            raise APIError(
                400, "cache_salt must be a non-empty string", "BadRequestError", "cache_salt"
            )

    def sampling_params(
        self, body: GenerateRequest, default_max_tokens: int = 16
    ) -> SamplingParams:
        """The body's sampling parameters (what needs the tokenizer is checked later)."""
        try:
            params = body.sampling_params(default_max_tokens)
        except ValueError as e:
            raise APIError(400, str(e), "BadRequestError", param_of(str(e))) from None
        if params.structured_outputs is None:
            return params
        param = body.structured_param()
        try:
            checked = backends.check(params.structured_outputs, self.structured_outputs, param)
        except backends.SpecError as e:
            raise APIError(400, str(e), "BadRequestError", param) from None
        return dataclasses.replace(params, structured_outputs=checked)

    def usage_options(self, body: GenerateRequest) -> UsageOptions:
        return UsageOptions.of(body, self.enable_prompt_tokens_details)

    def tool_plan(self, body: ChatCompletionRequest, params: SamplingParams):
        """The request's tool plan (None without tools) and its sampling parameters with
        the constraint a `required` or named tool choice decodes under."""
        try:
            plan = plan_tools(body, self.enable_auto_tool_choice, self.tool_call_parser)
        except ToolChoiceError as e:
            raise APIError(400, str(e), "BadRequestError", e.param) from None
        constraint = None if plan is None else plan.constraint(parameters_of(body))
        if constraint is None:
            return plan, params
        if params.structured_outputs is not None:
            raise APIError(400, f"tool_choice {plan.mode!r} is a constraint of its own: "
                           "response_format and structured_outputs must not be given with it",
                           "BadRequestError", "tool_choice")  # fmt: skip
        try:
            checked = backends.check(constraint, self.structured_outputs, "tools")
        except backends.SpecError as e:
            raise APIError(400, str(e), "BadRequestError", "tools") from None
        return plan, dataclasses.replace(params, structured_outputs=checked)

    def after_reasoning(self, params: SamplingParams) -> SamplingParams:
        """A chat request's constraint, to start where its reasoning ends (with a reasoning
        parser, unless the config's `enable_in_reasoning` says otherwise)."""
        so = params.structured_outputs
        if so is None or not self.reasoning_parser or self.structured_outputs.enable_in_reasoning:
            return params
        so = dataclasses.replace(so, reasoning_parser=self.reasoning_parser)
        return dataclasses.replace(params, structured_outputs=so)

    async def chat_prompt(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        try:
            return await self.client.apply_chat_template(messages, add_generation_prompt)
        except ValueError as e:
            raise APIError(400, str(e), "BadRequestError", "messages") from None

    def check_token_ids(self, ids: list[int], param: str) -> None:
        """Every id is in the vocabulary (/detokenize's; a prompt's are checked where it is
        tokenized, `engine.preprocess`)."""
        if any(not 0 <= t < self.client.vocab_size for t in ids):
            raise APIError(
                400,
                f"{param} must be in [0, {self.client.vocab_size})",
                "BadRequestError",
                param,
            )

    async def submit(
        self, api: ApiRequest, base_id: str, body: GenerateRequest, inputs: GenerateInput
    ) -> tuple[list[AsyncIterator[GenerationChunk]], list[Choice], int]:
        """Submit `n` samples of each prompt, prefilled once (choice index = prompt * n + j;
        a seeded request's j-th sample uses seed + j, as vLLM does): watched streams, their
        choices, and the number of prompt tokens."""
        # A client's own request_id may come again (while the first runs, or soon after,
        # when the stages still remember it): the engine's ids get a suffix of their own.
        if body.request_id is not None:
            base_id = f"{base_id}-{uuid.uuid4().hex[:8]}"
        inputs.request_ids = [
            f"{base_id}-{i * body.n + j}" for i in range(inputs.num_prompts) for j in range(body.n)
        ]
        inputs.trace_context = api.trace_context
        try:
            with api.active():
                prompts, gens = await self.client.submit(inputs)
        except InvalidRequest as e:
            raise APIError(400, str(e), "BadRequestError", e.param) from None
        except ValueError as e:
            raise engine_error(e) from None
        if self.log_requests:
            self._log(base_id, prompts, inputs)
        streams, choices = [], []
        for i, prompt in enumerate(prompts):
            for j in range(body.n):
                index = i * body.n + j
                streams.append(
                    api.watch(inputs.request_ids[index], len(prompt.token_ids), gens[index])
                )
                prompt_ids = prompt.token_ids if body.return_token_ids else None
                choice = Choice(index, prompt.text, prompt_ids)
                choice.wants_prompt_logprobs = body.prompt_logprobs is not None
                choice.prompt_ids = prompt.token_ids
                choices.append(choice)
        return streams, choices, sum(len(p.token_ids) for p in prompts)

    def _log(self, base_id: str, prompts, inputs: GenerateInput) -> None:
        """vLLM's --enable-log-requests line, one per prompt."""
        n = self.max_log_len
        for i, prompt in enumerate(prompts):
            logger.info(
                "Received request %s (prompt %d): prompt: %r, params: %s, prompt_token_ids: %s",
                base_id, i, prompt.text[:n] if n is not None else prompt.text, inputs.params,
                prompt.token_ids[:n] if n is not None else prompt.token_ids,
            )  # fmt: skip
