"""OpenAI response shapes for the gateway: usage, per-chunk choices, and running several
requests' streams to the end (collected) or as server-sent events."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable, Sequence

from fastapi.responses import JSONResponse

from tandem.services.gateway.engine_client import GenerationChunk
from tandem.services.gateway.protocol import GenerateRequest


class APIError(Exception):
    """An error the client caused (or a refusal), rendered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )


def error_response(status: int, message: str, type_: str, param=None, code=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def param_of(message: str) -> str | None:
    match = re.match(r"([a-z_]+) must", message)
    return match.group(1) if match else None


def include_usage(body: GenerateRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_chunk(i: int, chunk: GenerationChunk) -> dict:
    choice = {
        "index": i,
        "text": chunk.text,
        "logprobs": None,
        "finish_reason": chunk.finish_reason,
    }
    if chunk.finish_reason is not None:
        choice["stop_reason"] = chunk.stop_reason
    return choice


def chat_chunk(i: int, chunk: GenerationChunk) -> dict | None:
    if not chunk.text and chunk.finish_reason is None:
        return None  # nothing to say yet (text held back): no empty delta
    choice = {
        "index": i,
        "delta": {"content": chunk.text} if chunk.text else {},
        "logprobs": None,
        "finish_reason": chunk.finish_reason,
    }
    if chunk.finish_reason is not None:
        choice["stop_reason"] = chunk.stop_reason
    return choice


async def collect(
    streams: list[AsyncIterator[GenerationChunk]],
) -> tuple[list[str], list[GenerationChunk | None], int]:
    """Run requests to the end: each one's text, each one's last chunk, and the number of
    tokens generated in all."""
    texts: list[list[str]] = [[] for _ in streams]
    last: list[GenerationChunk | None] = [None] * len(streams)
    completion_tokens = 0
    try:
        async for i, chunk in merge(streams):
            texts[i].append(chunk.text)
            completion_tokens += len(chunk.token_ids)
            last[i] = chunk
    except ValueError as e:
        raise APIError(400, str(e), "BadRequestError", param_of(str(e))) from None
    except RuntimeError as e:  # the engine side failed the request; the server goes on
        raise APIError(503, str(e), "ServiceUnavailableError") from None
    return ["".join(t) for t in texts], last, completion_tokens


async def stream_sse(
    streams: list[AsyncIterator[GenerationChunk]],
    prompts: list[list[int]],
    meta: dict,
    include_usage: bool,
    format_choice: Callable[[int, GenerationChunk], dict | None],
    preamble: Sequence[dict] = (),
) -> AsyncIterator[str]:
    """SSE: the preamble's choices, then one event per chunk per choice (as format_choice
    renders it; None skips the chunk), then usage (when asked), then [DONE]. Closing the
    response (client gone) aborts whatever is still running."""
    completion_tokens = 0
    try:
        for choice in preamble:
            yield sse(dict(meta, choices=[choice]))
        async for i, chunk in merge(streams):
            completion_tokens += len(chunk.token_ids)
            choice = format_choice(i, chunk)
            if choice is not None:
                yield sse(dict(meta, choices=[choice]))
        if include_usage:
            usage = usage_of(sum(len(p) for p in prompts), completion_tokens)
            yield sse(dict(meta, choices=[], usage=usage))
        yield "data: [DONE]\n\n"
    except (ValueError, RuntimeError) as e:
        bad_input = isinstance(e, ValueError)
        err = {
            "error": {
                "message": str(e),
                "type": "BadRequestError" if bad_input else "ServiceUnavailableError",
                "param": param_of(str(e)) if bad_input else None,
                "code": 400 if bad_input else 503,
            }
        }
        yield sse(err)


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def merge(
    streams: list[AsyncIterator[GenerationChunk]],
) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """Interleave several requests' chunks as they arrive. If the consumer stops early
    (client gone, error), every stream is closed, which aborts its request."""
    out: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[GenerationChunk]) -> None:
        try:
            async for chunk in stream:
                await out.put((i, chunk))
        except Exception as e:  # surfaced to the consumer below
            await out.put((i, e))
        finally:
            await out.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await out.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
