"""The OpenAI-compatible REST gateway. It sees only an EngineClient.

`build_app` assembles it: the shared state, the error handlers (every error in OpenAI's
shape), the guard (API key, body size), CORS and the routes (in routes.py)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tandem.engine.client import EngineClient
from tandem.engine.pooling import detect_runner
from tandem.engine.structured_output.params import StructuredOutputsConfig
from tandem.services.gateway.guard import DEFAULT_MAX_BODY_BYTES, Guard
from tandem.services.gateway.pooling_api import router as pooling_router
from tandem.services.gateway.responses import router as responses_router
from tandem.services.gateway.routes import router
from tandem.services.gateway.state import GatewayState
from tandem.services.gateway.streaming import APIError, error_response
from tandem.services.gateway.telemetry import Telemetry

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """What `tandem serve` / `tandem gateway` set of the HTTP side (vLLM's flags)."""

    served_model_names: tuple[str, ...]
    model_path: str
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    allowed_origins: tuple[str, ...] = ("*",)  # CORS, as vLLM: everything by default
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    disable_fastapi_docs: bool = False  # no /docs, /redoc, /openapi.json
    log_requests: bool = False
    max_log_len: int | None = None
    structured_outputs: StructuredOutputsConfig = StructuredOutputsConfig()
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    enable_prompt_tokens_details: bool = False
    runner: str = "auto"  # vLLM's --runner and --convert: the model's kind (engine.pooling)
    convert: str = "auto"
    enable_lora: bool = False
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, PEFT folder)
    max_lora_rank: int = 16
    allow_runtime_lora_updating: bool = False


def model_kind(settings: GatewaySettings) -> tuple[str, tuple[str, ...] | None, int | None]:
    """(generate or pooling, a classifier's labels, the hidden size) from the model folder;
    a path without a config.json (a test's) generates."""
    config_file = Path(settings.model_path) / "config.json"
    if not config_file.is_file():
        return "generate", None, None
    config = json.loads(config_file.read_text())
    runner = detect_runner(settings.model_path, config, settings.runner, settings.convert)
    hidden = config.get("hidden_size")
    if not any(a.endswith("ForSequenceClassification") for a in config.get("architectures", [])):
        return runner, None, hidden
    labels = config.get("id2label") or {"0": "LABEL_0"}
    return runner, tuple(labels[k] for k in sorted(labels, key=int)), hidden


def build_app(client: EngineClient, settings: GatewaySettings) -> FastAPI:
    runner, classifier, hidden_size = model_kind(settings)
    if runner == "pooling" and hasattr(client, "needs_decode"):
        client.needs_decode = False  # pooling requests end on their prefill worker
    state = GatewayState(
        client=client,
        telemetry=Telemetry(settings.served_model_names[0]),
        served_model_names=settings.served_model_names,
        model_path=settings.model_path,
        created=int(time.time()),
        log_requests=settings.log_requests,
        max_log_len=settings.max_log_len,
        structured_outputs=settings.structured_outputs,
        enable_auto_tool_choice=settings.enable_auto_tool_choice,
        tool_call_parser=settings.tool_call_parser,
        reasoning_parser=settings.reasoning_parser,
        enable_prompt_tokens_details=settings.enable_prompt_tokens_details,
        runner=runner,
        classifier=classifier,
        hidden_size=hidden_size,
        enable_lora=settings.enable_lora,
        loras=dict(settings.lora_modules),
        max_lora_rank=settings.max_lora_rank,
        allow_runtime_lora_updating=settings.allow_runtime_lora_updating,
    )
    # FastAPI's own spans (three per call, health checks included) are off: the gateway
    # opens one span per generation request itself, the root of the request's trace.
    off = {"tracing": False, "metrics": False, "logs": False}
    docs = {"openapi_url": None, "docs_url": None, "redoc_url": None}
    app = FastAPI(
        title="Tandem",
        version="0.1.0",
        lifespan=lifespan,
        telemetry=off,
        **(docs if settings.disable_fastapi_docs else {}),
    )
    app.state.gateway = state
    app.add_middleware(Guard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(settings.allowed_origins),
        allow_methods=list(settings.allowed_methods),
        allow_headers=list(settings.allowed_headers),
        allow_credentials=settings.allow_credentials,
    )
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.include_router(router)
    app.include_router(responses_router)
    app.include_router(pooling_router)
    return app


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    """Connect the client in the background (/health answers 503 until it is); shut it
    down with the app."""
    client = app.state.gateway.client
    starter = asyncio.create_task(_start_client(client))
    try:
        yield
    finally:
        starter.cancel()
        await client.shutdown()


async def api_error(_: Request, e: APIError) -> JSONResponse:
    return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)


async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
    """A request body that does not fit its model: a 400 naming the first bad field."""
    first = e.errors()[0] if e.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    msg = first.get("msg", "invalid request")
    param = loc[0] if loc else None
    text = f"{'.'.join(loc)}: {msg}" if loc else msg
    return error_response(400, text, "BadRequestError", param)


async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    type_ = "NotFoundError" if e.status_code == 404 else "BadRequestError"
    return error_response(e.status_code, str(e.detail), type_)


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
