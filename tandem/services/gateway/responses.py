"""POST /v1/responses: OpenAI's Responses API, stateless (nothing is stored: `store` is
accepted and ignored, `previous_response_id` is a 400).

A request becomes a chat request (`instructions` as the system message, input items as
messages: message items, `function_call` items as an assistant's tool calls,
`function_call_output` items as tool results; `tools`, `tool_choice`, `text.format` as
response_format, `max_output_tokens`) and runs as one; the reply is rendered as a response
object with `message` and `function_call` output items, or streamed as the `response.*`
events the openai SDK's `responses.create(stream=True)` and `responses.stream` consume.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from tandem.engine.client import GenerationChunk
from tandem.services.gateway.protocol import ChatCompletionRequest
from tandem.services.gateway.reasoning import ReasoningStream
from tandem.services.gateway.routes import Gateway, start_chat
from tandem.services.gateway.streaming import APIError, collect, sse, started
from tandem.services.gateway.tools import ToolStream, message_of

router = APIRouter()


class ResponsesRequest(BaseModel):
    """The fields served; others OpenAI defines (metadata, user, truncation, ...) are
    accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    background: bool = False
    seed: int | None = None  # vLLM's extra


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [] if isinstance(part, dict))


def chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The request as chat; APIError (400) for what cannot be served."""
    if req.previous_response_id is not None:
        raise APIError(400, "previous_response_id must not be set: responses are not stored",
                       "BadRequestError", "previous_response_id")  # fmt: skip
    if req.background:
        raise APIError(400, "background must be false", "BadRequestError", "background")
    messages: list[dict] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(
                {"role": item.get("role"), "content": _content_text(item.get("content"))}
            )
        elif kind == "function_call":
            function = {"name": item.get("name"), "arguments": item.get("arguments")}
            call = {"id": item.get("call_id"), "type": "function", "function": function}
            if messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]:
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else json.dumps(output)
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
        else:
            raise APIError(400, f"input items of type {kind!r} are not supported",
                           "BadRequestError", "input")  # fmt: skip
    body: dict[str, Any] = {"messages": messages, "parallel_tool_calls": req.parallel_tool_calls}
    if req.model is not None:
        body["model"] = req.model
    for name, value in (("temperature", req.temperature), ("top_p", req.top_p),
                        ("max_tokens", req.max_output_tokens), ("seed", req.seed)):  # fmt: skip
        if value is not None:
            body[name] = value
    if req.tools:
        body["tools"] = [_chat_tool(t) for t in req.tools]
    if req.tool_choice is not None:
        choice = req.tool_choice
        if isinstance(choice, dict):
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        body["tool_choice"] = choice
    fmt = (req.text or {}).get("format")
    if fmt and fmt.get("type") == "json_schema":
        schema = {"name": fmt.get("name", "output"), "schema": fmt.get("schema"),
                  "strict": fmt.get("strict")}  # fmt: skip
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif fmt and fmt.get("type") == "json_object":
        body["response_format"] = {"type": "json_object"}
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        error = e.errors()[0]
        raise APIError(400, f"input: {error['msg']}", "BadRequestError", "input") from None


def _chat_tool(tool: dict) -> dict:
    if tool.get("type") != "function":
        raise APIError(400, "tools must be function tools", "BadRequestError", "tools")
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
    return {"type": "function", "function": function}


def _message_item(text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}  # fmt: skip


def _call_item(name: str, arguments: str, call_id: str | None = None) -> dict:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}",
            "call_id": call_id or f"call_{uuid.uuid4().hex}", "name": name,
            "arguments": arguments, "status": "completed"}  # fmt: skip


def _response(rid: str, req: ResponsesRequest, model: str, created: int, status: str,
              output: list[dict], usage: dict | None, incomplete: bool) -> dict:  # fmt: skip
    return {
        "id": rid, "object": "response", "created_at": created, "status": status,
        "model": model, "output": output, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "parallel_tool_calls": req.parallel_tool_calls, "temperature": req.temperature,
        "top_p": req.top_p, "tool_choice": req.tool_choice or "auto", "tools": req.tools or [],
        "text": req.text or {"format": {"type": "text"}}, "store": False, "metadata": {},
        "usage": usage,
    }  # fmt: skip


def _usage(num_prompt_tokens: int, completion_tokens: int) -> dict:
    return {"input_tokens": num_prompt_tokens, "output_tokens": completion_tokens,
            "total_tokens": num_prompt_tokens + completion_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0}}  # fmt: skip


def output_items(text: str, plan) -> list[dict]:
    message, _ = message_of(plan, text)
    items = []
    if message.get("content"):
        items.append(_message_item(message["content"]))
    for call in message.get("tool_calls", []):
        items.append(_call_item(call["function"]["name"], call["function"]["arguments"]))
    return items or [_message_item("")]


@router.post("/v1/responses")
async def responses(req: ResponsesRequest, gateway: Gateway):
    body = chat_request(req)
    rid = f"resp_{uuid.uuid4().hex}"
    run = await start_chat(body, gateway, "/v1/responses", rid)
    created, model = int(time.time()), gateway.served_model_name
    if req.stream:
        chunks = await started(run.streams)
        events = _stream(chunks, run, req, rid, model, created)
        return StreamingResponse(events, media_type="text/event-stream")
    completion_tokens = await collect(run.streams, run.choices)
    choice = run.choices[0]
    text = choice.text if run.thinking is None else run.thinking.split(choice.text)[1]
    incomplete = choice.last is not None and choice.last.finish_reason == "length"
    usage = _usage(run.num_prompt_tokens, completion_tokens)
    output = output_items(text, run.plan)
    return _response(rid, req, model, created, "incomplete" if incomplete else "completed",
                     output, usage, incomplete)  # fmt: skip


async def _stream(chunks, run, req, rid, model, created):
    """The response.* events: created, in_progress, the message's text deltas as they come
    (only what cannot be a tool call's markup), then each call, then completed."""
    seq = 0

    def event(kind: str, **fields) -> str:
        nonlocal seq
        seq += 1
        return sse({"type": kind, "sequence_number": seq - 1, **fields})

    shell = _response(rid, req, model, created, "in_progress", [], None, False)
    yield event("response.created", response=shell)
    yield event("response.in_progress", response=shell)
    plan = run.plan
    tools = ToolStream(plan) if plan is not None else None
    think = ReasoningStream(run.thinking) if run.thinking is not None else None
    message = _message_item("", "in_progress")
    text, opened, completion_tokens, last = "", False, 0, None
    output: list[dict] = []
    try:
        async for _, chunk in chunks:
            chunk: GenerationChunk
            completion_tokens += len(chunk.token_ids)
            last = chunk
            piece = chunk.text
            if think is not None:  # the reasoning is not part of the message
                piece = think.feed(piece, chunk.finish_reason is not None)[1]
            delta = piece if tools is None else tools.content(piece)
            if chunk.finish_reason is not None and tools is not None:
                rest, _ = tools.finish()
                delta += rest
            if delta and not opened:
                opened = True
                yield event("response.output_item.added", output_index=0,
                            item=message | {"content": []})  # fmt: skip
                yield event("response.content_part.added", item_id=message["id"], output_index=0,
                            content_index=0, part=message["content"][0])  # fmt: skip
            if delta:
                text += delta
                yield event("response.output_text.delta", item_id=message["id"], output_index=0,
                            content_index=0, delta=delta, logprobs=[])  # fmt: skip
    finally:
        await chunks.aclose()
    if opened:
        part = {"type": "output_text", "text": text, "annotations": []}
        yield event("response.output_text.done", item_id=message["id"], output_index=0,
                    content_index=0, text=text, logprobs=[])  # fmt: skip
        yield event("response.content_part.done", item_id=message["id"], output_index=0,
                    content_index=0, part=part)  # fmt: skip
        done = message | {"status": "completed", "content": [part]}
        yield event("response.output_item.done", output_index=0, item=done)
        output.append(done)
    calls = [] if tools is None else plan.extract(tools.text)[1]
    for call in calls:
        index = len(output)
        item = _call_item(call.name, call.arguments)
        yield event("response.output_item.added", output_index=index,
                    item=item | {"arguments": "", "status": "in_progress"})  # fmt: skip
        yield event("response.function_call_arguments.delta", item_id=item["id"],
                    output_index=index, delta=call.arguments)  # fmt: skip
        yield event("response.function_call_arguments.done", item_id=item["id"],
                    output_index=index, arguments=call.arguments, name=call.name)  # fmt: skip
        yield event("response.output_item.done", output_index=index, item=item)
        output.append(item)
    incomplete = last is not None and last.finish_reason == "length"
    usage = _usage(run.num_prompt_tokens, completion_tokens)
    status = "incomplete" if incomplete else "completed"
    final = _response(rid, req, model, created, status, output, usage, incomplete)
    yield event("response.incomplete" if incomplete else "response.completed", response=final)
    yield "data: [DONE]\n\n"
