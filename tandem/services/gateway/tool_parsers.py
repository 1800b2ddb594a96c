"""Tool-call parsers for `tool_choice: "auto"` (vLLM's `--tool-call-parser NAME`): each
finds the calls in a model's text as its chat template teaches it to write them.

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number (Hermes,
  Qwen2.5 and many more).
- `llama3_json`: the text is one JSON object `{"name": ..., "parameters": {...}}` (or several
  separated by `;`), after an optional `<|python_tag|>` (Llama 3.1-3.3).
- `mistral`: `[TOOL_CALLS]` then a JSON list of `{"name", "arguments"}` (Mistral).
- `pythonic`: the text is a Python list of calls, `[get_weather(city="Paris"), ...]`
  (Llama 3.2 and 4); arguments must be literals.

A parser gives the text before the calls as content. `--tool-parser-plugin FILE` runs a
Python file that may `register` its own parser class. For streaming, `hold_from` says from
where the text may be markup: content is streamed up to there, the rest once parsed.
"""

from __future__ import annotations

import ast
import json
import re
import runpy
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text


class ToolParser:
    """Finds tool calls in a model's whole output."""

    name = ""

    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls); no calls: the text is all content."""
        raise NotImplementedError

    def hold_from(self, text: str) -> int:
        """How much of `text` (the output so far) may be streamed as content: up to where
        markup starts or could start."""
        return len(text)


def _call(obj, arguments_key: str = "arguments") -> ParsedCall:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError("not a call")
    args = obj.get(arguments_key, obj.get("arguments", obj.get("parameters", {})))
    return ParsedCall(obj["name"], args if isinstance(args, str) else json.dumps(args))


def _marker_hold(text: str, marker: str) -> int:
    """Up to the marker, or to a tail of the text that could begin it."""
    at = text.find(marker)
    if at >= 0:
        return at
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return len(text) - k
    return len(text)


def _content(text: str) -> str | None:
    return text if text.strip() else None


class HermesParser(ToolParser):
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"
    PATTERN = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def extract(self, text):
        at = text.find(self.START)
        if at < 0:
            return text, []
        try:
            calls = [_call(json.loads(m.group(1))) for m in self.PATTERN.finditer(text, at)]
        except (ValueError, json.JSONDecodeError):
            return text, []
        return _content(text[:at]), calls

    def hold_from(self, text):
        return _marker_hold(text, self.START)


class MistralParser(ToolParser):
    name = "mistral"
    START = "[TOOL_CALLS]"

    def extract(self, text):
        at = text.find(self.START)
        if at < 0:
            return text, []
        try:
            found = json.loads(text[at + len(self.START) :].strip())
            calls = [_call(c) for c in (found if isinstance(found, list) else [found])]
        except (ValueError, json.JSONDecodeError):
            return text, []
        return _content(text[:at]), calls

    def hold_from(self, text):
        return _marker_hold(text, self.START)


class _WholeTextParser(ToolParser):
    """Parsers whose calls are the whole output: nothing is streamed as content until the
    first character says whether it is a call."""

    opening = ""

    def hold_from(self, text):
        stripped = text.lstrip()
        if any(stripped.startswith(o) or o.startswith(stripped) for o in self.opening):
            return 0  # a call, or it may still become one
        return len(text)


class Llama3JsonParser(_WholeTextParser):
    name = "llama3_json"
    opening = ("{", "<|python_tag|>")

    def extract(self, text):
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return text, []
        try:
            decoder, calls, at = json.JSONDecoder(), [], 0
            while at < len(body):
                obj, at = decoder.raw_decode(body, at)
                calls.append(_call(obj, "parameters"))
                at = len(body) - len(body[at:].lstrip().removeprefix(";").lstrip())
        except (ValueError, json.JSONDecodeError):
            return text, []
        return None, calls


class PythonicParser(_WholeTextParser):
    name = "pythonic"
    opening = ("[",)

    def extract(self, text):
        body = text.strip().removeprefix("<|python_start|>").removesuffix("<|python_end|>")
        try:
            tree = ast.parse(body.strip(), mode="eval").body
            if not isinstance(tree, ast.List) or not tree.elts:
                return text, []
            calls = []
            for node in tree.elts:
                if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                    return text, []
                if node.args:
                    return text, []
                args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
                calls.append(ParsedCall(node.func.id, json.dumps(args)))
        except (SyntaxError, ValueError, TypeError):
            return text, []
        return None, calls


PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser, PythonicParser)
}


def register(cls: type[ToolParser]) -> type[ToolParser]:
    """For a `--tool-parser-plugin` file: `@register` on a ToolParser subclass with a name."""
    if not cls.name:
        raise ValueError("a tool parser needs a name")
    PARSERS[cls.name] = cls
    return cls


def load_plugin(path: str) -> None:
    """Run a plugin file (it registers its parsers)."""
    runpy.run_path(path)


def get_parser(name: str) -> ToolParser:
    if name not in PARSERS:
        raise ValueError(
            f"--tool-call-parser must be one of {', '.join(sorted(PARSERS))} (or a name a "
            "--tool-parser-plugin registers)"
        )
    return PARSERS[name]()
