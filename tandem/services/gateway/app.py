"""The OpenAI-compatible REST gateway. It sees only an EngineClient."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from tandem.engine.client import EngineClient
from tandem.engine.request import SamplingParams
from tandem.services.gateway.guard import DEFAULT_MAX_BODY_BYTES, Guard
from tandem.services.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from tandem.services.gateway.streaming import (
    APIError,
    Choice,
    chat_chunk,
    chat_logprobs,
    collect,
    completion_chunk,
    completion_logprobs,
    error_response,
    include_usage,
    param_of,
    started,
    stream_sse,
    usage_of,
)
from tandem.services.gateway.telemetry import Telemetry

logger = logging.getLogger(__name__)


def json_safe(value):
    """`value` with every non-finite float (which JSON cannot hold) as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def build_app(
    client: EngineClient,
    served_model_name: str,
    model_path: str,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        starter = asyncio.create_task(_start_client(client))
        try:
            yield
        finally:
            starter.cancel()
            await client.shutdown()

    # FastAPI's own spans (three per call, health checks included) are off: the gateway
    # opens one span per generation request itself, the root of the request's trace.
    off = {"tracing": False, "metrics": False, "logs": False}
    app = FastAPI(title="Tandem", version="0.1.0", lifespan=lifespan, telemetry=off)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    telemetry = Telemetry(served_model_name)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = first.get("msg", "invalid request")
        param = loc[0] if loc else None
        text = f"{'.'.join(loc)}: {msg}" if loc else msg
        return error_response(400, text, "BadRequestError", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = "NotFoundError" if e.status_code == 404 else "BadRequestError"
        return error_response(e.status_code, str(e.detail), type_)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not client.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            body = telemetry.exposition(client.metrics())
        except Exception:  # the stages' part is skipped, the gateway's own still shown
            logger.exception("the stages' metrics could not be merged")
            body = telemetry.exposition([])
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/stats")
    async def stats() -> JSONResponse:
        try:
            return JSONResponse(json_safe(client.stats()))
        except Exception:  # never a 500 for a page of counters
            logger.exception("/stats could not be rendered")
            return JSONResponse({"error": "statistics unavailable; see the gateway's log"})

    @app.get("/v1/models")
    async def models() -> ModelList:
        card = ModelCard(
            id=served_model_name,
            created=created,
            root=model_path,
            max_model_len=client.max_model_len or None,
        )
        return ModelList(data=[card])

    def check_ready() -> None:
        if not client.ready:
            raise APIError(503, "the engine is still starting", "ServiceUnavailableError")

    def check_model(model: str | None) -> None:
        if model is not None and model != served_model_name:
            raise APIError(
                404,
                f"The model `{model}` does not exist.",
                "NotFoundError",
                "model",
                "model_not_found",
            )

    def check_request(body: GenerateRequest) -> None:
        check_ready()
        check_model(body.model)
        if body.cache_salt is not None and not body.cache_salt:
            raise APIError(
                400, "cache_salt must be a non-empty string", "BadRequestError", "cache_salt"
            )

    def sampling_params(
        body: GenerateRequest, default_max_tokens: int = 16, bad_words=()
    ) -> SamplingParams:
        try:
            params = body.sampling_params(default_max_tokens, bad_words)
            params.check_vocab(client.vocab_size)
            return params
        except ValueError as e:
            raise APIError(400, str(e), "BadRequestError", param_of(str(e))) from None

    async def bad_words_ids(words: list[str] | None) -> tuple[tuple[int, ...], ...]:
        """Each bad word as token sequences, alone and after a space (as vLLM does)."""
        out: list[tuple[int, ...]] = []
        for word in words or ():
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = tuple(await client.encode(text, add_special_tokens=False))
                if ids and ids not in out:
                    out.append(ids)
        return tuple(out)

    def truncated(ids: list[int], body: GenerateRequest) -> list[int]:
        k = body.truncate_prompt_tokens
        return ids[-k:] if k is not None else ids

    def fan_out(api, base_id: str, prompts, params, body, prefixes=None):
        # A client's own request_id may come again (while the first runs, or soon after,
        # when the stages still remember it): the engine's ids get a suffix of their own.
        if body.request_id is not None:
            base_id = f"{base_id}-{uuid.uuid4().hex[:8]}"
        """`n` samples per prompt, prefilled once (choice index = prompt * n + j; a seeded
        request's j-th sample uses seed + j, as vLLM does): watched streams and choices."""
        streams, choices = [], []
        for i, ids in enumerate(prompts):
            rids = [f"{base_id}-{i * body.n + j}" for j in range(body.n)]
            try:
                gens = client.generate_many(
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

    def check_prompt(ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, f"{param} must not be empty", "BadRequestError", param)
        if any(not 0 <= t < client.vocab_size for t in ids):
            raise APIError(
                400,
                f"{param} token ids must be in [0, {client.vocab_size})",
                "BadRequestError",
                param,
            )
        if len(ids) >= client.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {client.max_model_len} tokens; "
                f"the prompt has {len(ids)} tokens and at least one must be generated.",
                "BadRequestError",
                param,
            )

    async def chat_prompt(messages: list[dict], add_generation_prompt: bool) -> list[int]:
        try:
            return await client.apply_chat_template(messages, add_generation_prompt)
        except ValueError as e:
            raise APIError(400, str(e), "BadRequestError", "messages") from None

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_request(body)
        base_id = body.request_id or f"cmpl-{uuid.uuid4().hex}"
        api = telemetry.observe("/v1/completions", base_id, sampling_params(body))
        with api.failing():
            with api.active():
                prompts = [
                    await client.encode(p) if isinstance(p, str) else list(p)
                    for p in body.prompts()
                ]
                bad_words = await bad_words_ids(body.bad_words)
            prompts = [truncated(ids, body) for ids in prompts]
            for ids in prompts:
                check_prompt(ids, "prompt")
            params = sampling_params(body, 16, bad_words)
            prefixes = None
            if body.echo:
                prefixes = [
                    p
                    if isinstance(p, str) and body.truncate_prompt_tokens is None
                    else await client.decode(ids)
                    for p, ids in zip(body.prompts(), prompts)
                ]
        streams, choices = fan_out(api, base_id, prompts, params, body, prefixes)
        meta = dict(
            id=base_id, object="text_completion", created=int(time.time()), model=served_model_name
        )
        num_prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:
            chunks = await started(streams)
            events = stream_sse(
                chunks, choices, num_prompt_tokens, meta, include_usage(body), completion_chunk
            )
            return StreamingResponse(events, media_type="text/event-stream")
        completion_tokens = await collect(streams, choices)
        rendered = [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": completion_logprobs(c.logprobs, len(c.prefix)),
                **c.finish(),
            }
            for c in choices
        ]
        return dict(meta, choices=rendered, usage=usage_of(num_prompt_tokens, completion_tokens))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        check_request(body)
        base_id = body.request_id or f"chatcmpl-{uuid.uuid4().hex}"
        api = telemetry.observe("/v1/chat/completions", base_id, sampling_params(body))
        with api.failing():
            with api.active():
                ids = await chat_prompt(body.template_messages(), body.add_generation_prompt)
                bad_words = await bad_words_ids(body.bad_words)
            ids = truncated(ids, body)
            check_prompt(ids, "messages")
            # Without max_tokens, the reply may fill the rest of the context.
            params = sampling_params(body, client.max_model_len - len(ids), bad_words)
        streams, choices = fan_out(api, base_id, [ids], params, body)
        meta = dict(
            id=base_id,
            object="chat.completion",
            created=int(time.time()),
            model=served_model_name,
        )
        if body.stream:
            meta["object"] = "chat.completion.chunk"
            roles = [
                {
                    "index": c.index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                for c in choices
            ]
            chunks = await started(streams)
            events = stream_sse(
                chunks, choices, len(ids), meta, include_usage(body), chat_chunk, roles
            )
            return StreamingResponse(events, media_type="text/event-stream")
        completion_tokens = await collect(streams, choices)
        rendered = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(c.logprobs),
                **c.finish(),
            }
            for c in choices
        ]
        return dict(meta, choices=rendered, usage=usage_of(len(ids), completion_tokens))

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> JSONResponse:
        check_ready()
        await client.reset_prefix_cache()
        return JSONResponse({"status": "ok"})

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check_ready()
        check_model(body.model)
        if body.messages is not None and body.prompt is not None:
            raise APIError(
                400, "messages must not be given with prompt", "BadRequestError", "messages"
            )
        if body.messages is not None:
            messages = [m.to_template() for m in body.messages]
            tokens = await chat_prompt(messages, body.add_generation_prompt)
        elif body.prompt is not None:
            tokens = await client.encode(body.prompt, body.add_special_tokens)
        else:
            raise APIError(400, "prompt must be given (or messages)", "BadRequestError", "prompt")
        return {"tokens": tokens, "count": len(tokens), "max_model_len": client.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_ready()
        check_model(body.model)
        if any(not 0 <= t < client.vocab_size for t in body.tokens):
            raise APIError(
                400,
                f"tokens must be in [0, {client.vocab_size})",
                "BadRequestError",
                "tokens",
            )
        return {"prompt": await client.decode(body.tokens)}

    return app


async def _start_client(client: EngineClient) -> None:
    """Connect the client to its engine, retrying while the other stages come up."""
    for attempt in itertools.count():
        try:
            await client.start()
            return
        except Exception as e:  # not up yet: /health answers 503 meanwhile
            log = logger.info if attempt % 20 == 0 else logger.debug
            log("engine client not connected yet (%s); retrying", e)
            await asyncio.sleep(0.5)
