"""The gateway's endpoints, one function each. A route reaches the gateway's parts through
the `Gateway` dependency (the GatewayState that `build_app` put on the app)."""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from tandem import __version__
from tandem.engine.client import GenerateInput, GenerationChunk
from tandem.engine.lora.adapter import LoRAError, check_adapter
from tandem.engine.request import SamplingParams
from tandem.services.gateway import reasoning
from tandem.services.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)
from tandem.services.gateway.reasoning import reasoning_chunks
from tandem.services.gateway.state import GatewayState
from tandem.services.gateway.streaming import (
    APIError,
    Choice,
    UsageOptions,
    chat_chunk,
    chat_logprobs,
    collect,
    completion_chunk,
    completion_logprobs,
    echo_logprobs,
    started,
    stream_sse,
)
from tandem.services.gateway.tools import ToolPlan, message_of, tool_chat_chunks

logger = logging.getLogger(__name__)
router = APIRouter()


async def gateway_state(request: Request) -> GatewayState:
    return request.app.state.gateway


Gateway = Annotated[GatewayState, Depends(gateway_state)]


def json_safe(value):
    """`value` with every non-finite float (which JSON cannot hold) as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@router.get("/health")
async def health(gateway: Gateway) -> JSONResponse:
    if not gateway.client.ready:
        return JSONResponse({"status": "starting"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/version")
async def version() -> JSONResponse:
    return JSONResponse({"version": __version__})


@router.get("/metrics")
async def metrics(gateway: Gateway) -> Response:
    try:
        body = gateway.telemetry.exposition(gateway.client.metrics())
    except Exception:  # the stages' part is skipped, the gateway's own still shown
        logger.exception("the stages' metrics could not be merged")
        body = gateway.telemetry.exposition([])
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/stats")
async def stats(gateway: Gateway) -> JSONResponse:
    try:
        return JSONResponse(json_safe(gateway.client.stats()))
    except Exception:  # never a 500 for a page of counters
        logger.exception("/stats could not be rendered")
        return JSONResponse({"error": "statistics unavailable; see the gateway's log"})


@router.get("/v1/models")
async def models(gateway: Gateway) -> ModelList:
    cards = [
        ModelCard(
            id=name,
            created=gateway.created,
            root=gateway.model_path,
            max_model_len=gateway.client.max_model_len or None,
        )
        for name in gateway.served_model_names
    ]
    cards += [  # each adapter after the base model, its parent
        ModelCard(id=name, created=gateway.created, root=path, parent=gateway.served_model_name,
                  max_model_len=gateway.client.max_model_len or None)
        for name, path in gateway.loras.items()
    ]  # fmt: skip
    return ModelList(data=cards)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, gateway: Gateway):
    gateway.check_request(body)
    base_id = body.request_id or f"cmpl-{uuid.uuid4().hex}"
    params = gateway.sampling_params(body)
    api = gateway.telemetry.observe("/v1/completions", base_id, params)
    with api.failing():
        inputs = generate_input(gateway, body, params, prompts=body.prompts())
        inputs.return_prompt_text = body.echo
        streams, choices, num_prompt_tokens = await gateway.submit(api, base_id, body, inputs)
    meta = response_meta(gateway, base_id, "text_completion", body.model)
    echo_scores = body.echo and body.logprobs is not None
    if body.stream:
        for c in choices if echo_scores else ():
            c.echo_first = await gateway.client.decode(c.prompt_ids[:1], skip_special_tokens=False)
        usage = gateway.usage_options(body)
        return await sse_response(
            streams, choices, num_prompt_tokens, meta, usage, completion_chunk
        )
    completion_tokens = await collect(streams, choices)
    rendered = []
    for c in choices:
        logprobs = completion_logprobs(c.logprobs, len(c.prefix))
        out = {"index": c.index, "text": c.text, "logprobs": logprobs, **c.finish()}
        if body.prompt_only:  # the one token generated is dropped
            out.update(text=c.prefix, finish_reason="length", stop_reason=None)
        if echo_scores:
            first = await gateway.client.decode(c.prompt_ids[:1], skip_special_tokens=False)
            generated = None if body.prompt_only else c.logprobs
            out["logprobs"] = echo_logprobs(first, c.prompt_logprobs, generated)
        rendered.append(out)
    if body.prompt_only:
        completion_tokens = 0
    usage = gateway.usage_options(body).usage(num_prompt_tokens, completion_tokens, choices)
    return dict(meta, choices=rendered, usage=usage)


@dataclass(slots=True)
class ChatRun:
    """A chat request submitted: its tool plan, reasoning parser, streams and choices."""

    base_id: str
    plan: ToolPlan | None
    thinking: reasoning.ReasoningParser | None
    streams: list
    choices: list[Choice]
    num_prompt_tokens: int


async def start_chat(body: ChatCompletionRequest, gateway: GatewayState, route: str,
                     base_id: str) -> ChatRun:  # fmt: skip
    """Check, render and submit a chat request (for /v1/chat/completions and /v1/responses)."""
    gateway.check_request(body)
    # Without max_tokens, the reply may fill the rest of the context (known once tokenized).
    fill_context = body.requested_max_tokens() is None
    params = gateway.sampling_params(body, gateway.client.max_model_len or 1 << 30)
    plan, params = gateway.tool_plan(body, params)
    params = gateway.after_reasoning(params)
    thinking = gateway.reasoning_parser and reasoning.get_parser(gateway.reasoning_parser)
    api = gateway.telemetry.observe(route, base_id, params)
    with api.failing():
        inputs = generate_input(gateway, body, params, messages=body.template_messages())
        inputs.add_generation_prompt = body.add_generation_prompt
        inputs.fill_context = fill_context
        inputs.tools = None if plan is None else plan.tools
        inputs.chat_template_kwargs = body.template_kwargs()
        streams, choices, num_prompt_tokens = await gateway.submit(api, base_id, body, inputs)
    return ChatRun(base_id, plan, thinking or None, streams, choices, num_prompt_tokens)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, gateway: Gateway):
    base_id = body.request_id or f"chatcmpl-{uuid.uuid4().hex}"
    run = await start_chat(body, gateway, "/v1/chat/completions", base_id)
    plan, thinking, streams, choices = run.plan, run.thinking, run.streams, run.choices
    num_prompt_tokens = run.num_prompt_tokens
    if body.stream:
        meta = response_meta(gateway, base_id, "chat.completion.chunk", body.model)
        roles = [
            {
                "index": c.index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for c in choices
        ]
        render = chat_chunk if plan is None else tool_chat_chunks(plan)
        if thinking is not None:
            render = reasoning_chunks(thinking, render)
        usage = gateway.usage_options(body)
        return await sse_response(streams, choices, num_prompt_tokens, meta, usage, render, roles)
    meta = response_meta(gateway, base_id, "chat.completion", body.model)
    completion_tokens = await collect(streams, choices)
    rendered = []
    for c in choices:
        thought, text = (None, c.text) if thinking is None else thinking.split(c.text)
        message, called = message_of(plan, text)
        if thinking is not None:
            message["reasoning"] = message["reasoning_content"] = thought
        finish = c.finish()
        if called:
            finish["finish_reason"] = "tool_calls"
        rendered.append(
            {"index": c.index, "message": message, "logprobs": chat_logprobs(c.logprobs), **finish}
        )
    usage = gateway.usage_options(body).usage(num_prompt_tokens, completion_tokens, choices)
    return dict(meta, choices=rendered, usage=usage)


def generate_input(gateway: GatewayState, body: GenerateRequest, params: SamplingParams,
                   **prompt) -> GenerateInput:  # fmt: skip
    """What both generation routes hand the engine side (ids are set on submission); a
    model that names a LoRA adapter runs with it (its folder goes along: a worker that has
    not loaded it loads it from there)."""
    lora_path = gateway.loras.get(body.model) if body.model else None
    return GenerateInput(
        lora_name=body.model if lora_path is not None else None,
        lora_path=lora_path,
        request_ids=[],
        params=params,
        truncate_prompt_tokens=body.truncate_prompt_tokens,
        bad_words=list(body.bad_words or ()),
        priority=body.priority,
        cache_salt=body.cache_salt,
        **prompt,
    )


def _check_lora_updating(gateway: GatewayState) -> None:
    if not (gateway.enable_lora and gateway.allow_runtime_lora_updating):
        raise APIError(404, "Not Found: runtime LoRA updating is off (--enable-lora and "
                       "--allow-runtime-lora-updating turn it on)", "NotFoundError")  # fmt: skip


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRAAdapterRequest, gateway: Gateway) -> PlainTextResponse:
    """Serve a LoRA adapter from now on: checked here (rank, targets, format), then every
    worker reads it."""
    _check_lora_updating(gateway)
    gateway.check_ready()
    name, path = body.lora_name, body.lora_path
    if name in gateway.loras or name in gateway.served_model_names:
        raise APIError(400, f"The lora adapter '{name}' has already been loaded.",
                       "BadRequestError", "lora_name")  # fmt: skip
    try:
        check_adapter(name, path, gateway.max_lora_rank)
    except LoRAError as e:
        raise APIError(400, str(e), "BadRequestError", "lora_path") from None
    gateway.loras[name] = path
    await gateway.client.update_lora(name, path)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest,
                              gateway: Gateway) -> PlainTextResponse:  # fmt: skip
    _check_lora_updating(gateway)
    name = body.lora_name
    if gateway.loras.pop(name, None) is None:
        raise APIError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError",
                       "lora_name")  # fmt: skip
    await gateway.client.update_lora(name, None)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


@router.post("/reset_prefix_cache")
async def reset_prefix_cache(gateway: Gateway) -> JSONResponse:
    gateway.check_ready()
    await gateway.client.reset_prefix_cache()
    return JSONResponse({"status": "ok"})


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, gateway: Gateway):
    gateway.check_ready()
    gateway.check_model(body.model)
    if body.messages is not None and body.prompt is not None:
        raise APIError(400, "messages must not be given with prompt", "BadRequestError", "messages")
    if body.messages is not None:
        messages = [m.to_template() for m in body.messages]
        tokens = await gateway.chat_prompt(messages, body.add_generation_prompt)
    elif body.prompt is not None:
        tokens = await gateway.client.encode(body.prompt, body.add_special_tokens)
    else:
        raise APIError(400, "prompt must be given (or messages)", "BadRequestError", "prompt")
    return {"tokens": tokens, "count": len(tokens), "max_model_len": gateway.client.max_model_len}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, gateway: Gateway):
    gateway.check_ready()
    gateway.check_model(body.model)
    gateway.check_token_ids(body.tokens, "tokens")
    return {"prompt": await gateway.client.decode(body.tokens)}


def response_meta(gateway: GatewayState, response_id: str, object_: str,
                  model: str | None = None) -> dict:  # fmt: skip
    """The fields every completion response (and each of its chunks) starts with; `model`:
    the body's (an adapter's name comes back as it was asked for)."""
    return dict(id=response_id, object=object_, created=int(time.time()),
                model=gateway.model_name(model))  # fmt: skip


async def sse_response(
    streams: list[AsyncIterator[GenerationChunk]],
    choices: list[Choice],
    num_prompt_tokens: int,
    meta: dict,
    usage: UsageOptions,
    format_choice: Callable[[Choice, GenerationChunk], dict | list[dict] | None],
    preamble: Sequence[dict] = (),
) -> StreamingResponse:
    """The streams as server-sent events, once the first chunk is there (see `started`)."""
    chunks = await started(streams)
    events = stream_sse(chunks, choices, num_prompt_tokens, meta, usage, format_choice, preamble)
    return StreamingResponse(events, media_type="text/event-stream")
