"""OpenAI response shapes for the gateway: usage, per-chunk choices, and running several
requests' streams to the end (collected) or as server-sent events."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from tandem.engine.client import (
    RETRY_AFTER_S,
    EngineOverloaded,
    GenerationChunk,
    LogprobEntry,
)
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
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )
        self.headers = headers


def engine_error(e: Exception) -> APIError:
    """What the engine side raised for a request, as the client's HTTP error: its bad input
    (400), a refusal for now (503 with Retry-After), or a failure on the way (503)."""
    if isinstance(e, ValueError):
        param = getattr(e, "param", None) or param_of(str(e))  # InvalidRequest names it
        return APIError(400, str(e), "BadRequestError", param)
    if isinstance(e, EngineOverloaded):
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        return APIError(503, str(e), "ServiceUnavailableError", headers=retry)
    return APIError(503, str(e), "ServiceUnavailableError")


def error_response(
    status: int, message: str, type_: str, param=None, code=None, headers=None
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def param_of(message: str) -> str | None:
    match = re.match(r"([a-z_]+)[a-z_.]* must", message)
    return match.group(1) if match else None


@dataclass(frozen=True, slots=True)
class UsageOptions:
    """What a response says of its usage: at the end of a stream (`include`), on every
    chunk (`continuous`), with the prompt's prefix-cache hits (`details`, vLLM's
    --enable-prompt-tokens-details); `n` samples per prompt."""

    include: bool = False
    continuous: bool = False
    details: bool = False
    n: int = 1

    @classmethod
    def of(cls, body: GenerateRequest, details: bool) -> UsageOptions:
        options = body.stream_options
        return cls(bool(options and options.include_usage),
                   bool(options and options.continuous_usage_stats), details, body.n)  # fmt: skip

    def usage(self, prompt_tokens: int, completion_tokens: int, choices: list[Choice]) -> dict:
        out = usage_of(prompt_tokens, completion_tokens)
        if self.details:
            cached = sum(c.last.num_cached_tokens for c in choices[:: self.n] if c.last)
            out["prompt_tokens_details"] = {"cached_tokens": cached}
        return out


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(entries: list[LogprobEntry] | None, offset: int) -> dict | None:
    """OpenAI's legacy completions shape; `offset`: characters of the choice's text before
    these tokens."""
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [_by_text(e.top) for e in entries],
        "text_offset": offsets,
    }


def echo_logprobs(
    first: str, prompt: list[LogprobEntry] | None, generated: list[LogprobEntry] | None
) -> dict:
    """`echo` with `logprobs`, as vLLM returns them: the prompt's tokens (the first without
    a logprob, the others with the prompt token among their alternatives), then the
    generated ones, over the one text they make."""
    prompt, generated = prompt or [], generated or []
    tops: list[dict | None] = [None]
    for e in prompt:
        tops.append({e.token: e.logprob} | {t: lp for t, lp in _by_text(e.top).items()
                                             if t != e.token})  # fmt: skip
    tops += [_by_text(e.top) for e in generated]
    tokens = [first] + [e.token for e in prompt + generated]
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [None] + [e.logprob for e in prompt + generated],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def _by_text(top: list[tuple[int, str, float]]) -> dict[str, float]:
    """Alternatives keyed by text; tokens that render alike keep the likelier one."""
    out: dict[str, float] = {}
    for _, text, lp in top:
        out.setdefault(text, lp)
    return out


def chat_logprobs(entries: list[LogprobEntry] | None) -> dict | None:
    """OpenAI's chat shape: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    if entries is None:
        return None

    def one(text: str, lp: float) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    content = [
        dict(one(e.token, e.logprob), top_logprobs=[one(t, lp) for _, t, lp in e.top])
        for e in entries
    ]
    return {"content": content}


def prompt_logprobs_of(entries: list[LogprobEntry] | None, num_prompt_tokens: int):
    """vLLM's `prompt_logprobs`: None for the first prompt token, then per position the
    prompt token and the top alternatives, {token id: {logprob, rank, decoded_token}}."""
    if entries is None:
        return [None] if num_prompt_tokens else None
    out: list[dict | None] = [None]
    for e in entries:
        position = {str(e.token_id): {"logprob": e.logprob, "rank": e.rank,
                                      "decoded_token": e.token}}  # fmt: skip
        for rank, (token_id, text, lp) in enumerate(e.top, 1):
            position.setdefault(str(token_id), {"logprob": lp, "rank": rank,
                                                "decoded_token": text})  # fmt: skip
        out.append(position)
    return out


class Choice:
    """One choice's state while its request streams: text so far and what SSE needs."""

    def __init__(self, index: int, prefix: str = "", prompt_token_ids=None) -> None:
        self.index = index
        self.prefix = prefix  # echo: the prompt's text comes first
        self.prompt_token_ids = prompt_token_ids  # return_token_ids: the prompt's ids
        self.parts: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[LogprobEntry] | None = None
        self.prompt_logprobs: list[LogprobEntry] | None = None
        self.wants_prompt_logprobs = False
        self.prompt_ids: list[int] = []  # the prompt's token ids, as it went to the engine
        self.echo_first: str | None = None  # echo with logprobs: the prompt's first token
        self.last: GenerationChunk | None = None
        self.sent = 0  # characters streamed so far

    @property
    def text(self) -> str:
        return self.prefix + "".join(self.parts)

    def add(self, chunk: GenerationChunk) -> None:
        self.parts.append(chunk.text)
        self.token_ids += chunk.token_ids
        if chunk.logprobs is not None:
            self.logprobs = (self.logprobs or []) + chunk.logprobs
        if chunk.prompt_logprobs is not None:
            self.prompt_logprobs = chunk.prompt_logprobs
        self.last = chunk

    def finish(self) -> dict:
        """finish_reason, stop_reason (and the token ids when asked), for the last chunk."""
        last = self.last
        out = {
            "finish_reason": last.finish_reason if last else None,
            "stop_reason": last.stop_reason if last else None,
        }
        if self.prompt_token_ids is not None:
            out["prompt_token_ids"] = self.prompt_token_ids
            out["token_ids"] = self.token_ids
        if self.wants_prompt_logprobs:
            out["prompt_logprobs"] = prompt_logprobs_of(self.prompt_logprobs, 1)
        return out


def completion_chunk(choice: Choice, chunk: GenerationChunk) -> dict:
    text, logprobs = chunk.text, completion_logprobs(chunk.logprobs, choice.sent)
    if choice.sent == 0 and choice.prefix:
        text = choice.prefix + text
        if choice.echo_first is not None:  # the prompt's logprobs lead the first chunk
            logprobs = echo_logprobs(choice.echo_first, chunk.prompt_logprobs, chunk.logprobs)
    out = {"index": choice.index, "text": text, "logprobs": logprobs,
           "finish_reason": chunk.finish_reason}  # fmt: skip
    choice.sent += len(text)
    if chunk.finish_reason is not None:
        out.update(choice.finish())
    return out


def chat_chunk(choice: Choice, chunk: GenerationChunk) -> dict | None:
    if not chunk.text and chunk.finish_reason is None and chunk.logprobs is None:
        return None  # nothing to say yet (text held back): no empty delta
    out = {
        "index": choice.index,
        "delta": {"content": chunk.text} if chunk.text else {},
        "logprobs": chat_logprobs(chunk.logprobs),
        "finish_reason": chunk.finish_reason,
    }
    if chunk.finish_reason is not None:
        out.update(choice.finish())
    return out


async def collect(streams: list[AsyncIterator[GenerationChunk]], choices: list[Choice]) -> int:
    """Run requests to the end, into their choices. Returns the tokens generated in all."""
    completion_tokens = 0
    try:
        async for i, chunk in merge(streams):
            choices[i].add(chunk)
            completion_tokens += len(chunk.token_ids)
    except (ValueError, RuntimeError) as e:  # the engine side refused or failed it
        raise engine_error(e) from None
    return completion_tokens


async def started(
    streams: list[AsyncIterator[GenerationChunk]],
) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """The streams' merged chunks, once the first is there: a request refused or failed
    before its first token gets its HTTP status (400, 503), since a streaming response's
    status goes out with its first byte. Raises APIError."""
    merged = merge(streams)
    try:
        first = await anext(merged)
    except StopAsyncIteration:
        first = None
    except (ValueError, RuntimeError) as e:
        await merged.aclose()
        raise engine_error(e) from None

    async def chained() -> AsyncIterator[tuple[int, GenerationChunk]]:
        try:
            if first is not None:
                yield first
                async for item in merged:
                    yield item
        finally:
            await merged.aclose()

    return chained()


async def stream_sse(
    chunks: AsyncIterator[tuple[int, GenerationChunk]],
    choices: list[Choice],
    num_prompt_tokens: int,
    meta: dict,
    usage: UsageOptions,
    format_choice: Callable[[Choice, GenerationChunk], dict | list[dict] | None],
    preamble: Sequence[dict] = (),
) -> AsyncIterator[str]:
    """SSE of `started` chunks: the preamble's choices, then the events of each chunk per
    choice (as format_choice renders it: one, a list, or None to skip it), then usage (when
    asked), then [DONE]. Closing the response (client gone) aborts whatever is still running."""
    completion_tokens = 0
    try:
        for choice in preamble:
            yield sse(dict(meta, choices=[choice]))
        async for i, chunk in chunks:
            completion_tokens += len(chunk.token_ids)
            choices[i].token_ids += chunk.token_ids
            choices[i].last = chunk
            if chunk.prompt_logprobs is not None:
                choices[i].prompt_logprobs = chunk.prompt_logprobs
            rendered = format_choice(choices[i], chunk)
            for choice in rendered if isinstance(rendered, list) else [rendered]:
                if choice is None:
                    continue
                event = dict(meta, choices=[choice])
                if usage.continuous:
                    event["usage"] = usage.usage(num_prompt_tokens, completion_tokens, choices)
                yield sse(event)
        if usage.include:
            so_far = usage.usage(num_prompt_tokens, completion_tokens, choices)
            yield sse(dict(meta, choices=[], usage=so_far))
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
    finally:
        await chunks.aclose()


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
