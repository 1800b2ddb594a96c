"""Tool calling on chat completions, as vLLM serves it.

`tool_choice`:
- `none`: the tools reach the chat template; the output is plain content.
- `required`: the output is constrained (structured outputs) to a JSON list of calls,
  `[{"name": ..., "parameters": {...}}, ...]`, each one of the tools with arguments valid
  for its schema (one call at most when `parallel_tool_calls` is false).
- a named function: the output is constrained to that function's arguments.
- `auto` (the default when tools are given): the model writes what it wants, and the
  server's `--tool-call-parser` finds the calls in it; it needs `--enable-auto-tool-choice`.

Calls come back as OpenAI's `message.tool_calls` with `finish_reason: "tool_calls"`; when
streamed, content is streamed up to where markup may start, then each call as two deltas
(its index, id and name; then its arguments)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from tandem.engine.client import GenerationChunk
from tandem.engine.structured_output.params import StructuredOutputsParams
from tandem.services.gateway.protocol import ChatCompletionRequest, NamedToolChoice
from tandem.services.gateway.streaming import Choice, chat_logprobs
from tandem.services.gateway.tool_parsers import ParsedCall, ToolParser, get_parser


class ToolChoiceError(ValueError):
    """A request's tools or tool_choice that cannot be served; names the parameter."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How one request's tools are served: the mode, the named function (`named`), the
    parser (`auto`) and the tools as the chat template takes them."""

    mode: str  # none | auto | required | named
    tools: list[dict]
    function: str | None = None
    parser: ToolParser | None = None
    parallel: bool = True

    def constraint(self, parameters: dict[str, dict]) -> StructuredOutputsParams | None:
        """The structured output a `required` or named choice decodes under."""
        if self.mode == "named":
            return StructuredOutputsParams(json=json.dumps(parameters[self.function]))
        if self.mode != "required":
            return None
        calls = [
            {"type": "object",
             "properties": {"name": {"type": "string", "enum": [name]}, "parameters": schema},
             "required": ["name", "parameters"], "additionalProperties": False}
            for name, schema in parameters.items()
        ]  # fmt: skip
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=json.dumps(schema))

    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """The content and the calls of a whole output."""
        if self.mode == "named":
            return None, [ParsedCall(self.function, text.strip())]
        if self.mode == "required":
            try:
                calls = json.loads(text)
                return None, [ParsedCall(c["name"], json.dumps(c["parameters"])) for c in calls]
            except (ValueError, KeyError, TypeError):
                return text, []  # cut off by max_tokens: no valid call
        if self.mode == "auto":
            return self.parser.extract(text)
        return text, []


def plan_tools(
    body: ChatCompletionRequest, enable_auto_tool_choice: bool, parser_name: str | None
) -> ToolPlan | None:
    """The request's tool plan (None: no tools). ToolChoiceError as vLLM answers."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise ToolChoiceError("tool_choice must come with tools", "tool_choice")
        return None
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    parallel = body.parallel_tool_calls
    if choice == "none":
        return ToolPlan("none", tools, parallel=parallel)
    if isinstance(choice, NamedToolChoice):
        names = [t.function.name for t in body.tools]
        if choice.function.name not in names:
            raise ToolChoiceError(
                f"tool_choice names {choice.function.name!r}, which is not among the tools",
                "tool_choice",
            )
        return ToolPlan("named", tools, choice.function.name, parallel=parallel)
    if choice == "required":
        return ToolPlan("required", tools, parallel=parallel)
    if not enable_auto_tool_choice or parser_name is None:
        raise ToolChoiceError(
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
            "to be set",
            "tool_choice",
        )
    return ToolPlan("auto", tools, parser=get_parser(parser_name), parallel=parallel)


def parameters_of(body: ChatCompletionRequest) -> dict[str, dict]:
    """Each tool's argument schema (an object of anything when it has none)."""
    return {t.function.name: t.function.parameters or {"type": "object"} for t in body.tools or ()}


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def message_of(plan: ToolPlan | None, text: str) -> tuple[dict, bool]:
    """The assistant message of a whole output, and whether it made tool calls."""
    if plan is None:
        return {"role": "assistant", "content": text}, False
    content, calls = plan.extract(text)
    message: dict = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [
            {"id": tool_call_id(), "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls
        ]  # fmt: skip
    return message, bool(calls)


@dataclass(slots=True)
class ToolStream:
    """One streamed choice's text under a tool plan: what may go out as content now, and
    the calls at the end."""

    plan: ToolPlan
    text: str = ""
    sent: int = 0  # characters of `text` streamed as content
    deltas: list[dict] = field(default_factory=list)

    def content(self, delta: str) -> str:
        """The part of the output so far that can be streamed as content now."""
        self.text += delta
        if self.plan.mode in ("required", "named"):
            return ""
        upto = self.plan.parser.hold_from(self.text) if self.plan.mode == "auto" else None
        upto = len(self.text) if upto is None else upto
        out = self.text[self.sent : upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """At the end: content still held back that is not markup, and each call as two
        deltas (index, id and name; then its arguments)."""
        content, calls = self.plan.extract(self.text)
        if not calls:
            rest, self.sent = self.text[self.sent :], len(self.text)
            return rest, []
        deltas = []
        for i, c in enumerate(calls):
            deltas.append({"index": i, "id": tool_call_id(), "type": "function",
                           "function": {"name": c.name, "arguments": ""}})  # fmt: skip
            deltas.append({"index": i, "function": {"arguments": c.arguments}})
        rest = (content or "")[self.sent :]
        return rest, deltas


def tool_chat_chunks(plan: ToolPlan):
    """A chat chunk renderer (see streaming.stream_sse) for a streamed request with tools:
    content as ToolStream lets it out, then at the end each call's deltas and the finish."""
    states: dict[int, ToolStream] = {}

    def render(choice: Choice, chunk: GenerationChunk) -> list[dict] | None:
        state = states.setdefault(choice.index, ToolStream(plan))
        text = state.content(chunk.text)
        events = []
        deltas: list[dict] = []
        if chunk.finish_reason is not None:
            rest, deltas = state.finish()
            text += rest
        if text or chunk.logprobs is not None:
            delta = {"content": text} if text else {}
            logprobs = chat_logprobs(chunk.logprobs)
            events.append({"index": choice.index, "delta": delta, "logprobs": logprobs,
                           "finish_reason": None})  # fmt: skip
        for delta in deltas:
            events.append({"index": choice.index, "delta": {"tool_calls": [delta]},
                           "logprobs": None, "finish_reason": None})  # fmt: skip
        if chunk.finish_reason is not None:
            final = {"index": choice.index, "delta": {}, "logprobs": None}
            final.update(choice.finish())
            if deltas:
                final["finish_reason"] = "tool_calls"
            events.append(final)
        return events or None

    return render
