"""Reasoning parsers (vLLM's `--reasoning-parser NAME`): the text a thinking model writes
inside `<think>...</think>` goes to the message's `reasoning` field (vLLM's current name)
and `reasoning_content` (its former one, which clients still read), the rest to `content`
(and to the tool-call parser, when there are tools).

- `deepseek_r1`: the chat template opens `<think>` itself, so the output is reasoning until
  `</think>` (a leading `<think>` is dropped); without `</think>` it is all reasoning.
- `qwen3`: reasoning only inside `<think>...</think>` at the start of the output; without
  them (thinking switched off) it is all content.

An output cut off while thinking is all reasoning, whole as streamed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tandem.engine.client import GenerationChunk

START, END = "<think>", "</think>"


@dataclass(frozen=True, slots=True)
class ReasoningParser:
    name: str
    opened_by_template: bool  # deepseek_r1: the output starts inside the reasoning

    def split(self, text: str) -> tuple[str | None, str]:
        """(reasoning, content) of a whole output."""
        body = text.lstrip()
        if body.startswith(START):
            body = body[len(START) :]
        elif not self.opened_by_template:
            return None, text
        reasoning, end, content = body.partition(END)
        return (reasoning, content) if end else (body, "")  # cut off while thinking


PARSERS = {"deepseek_r1": ReasoningParser("deepseek_r1", True),
           "qwen3": ReasoningParser("qwen3", False)}  # fmt: skip


def get_parser(name: str) -> ReasoningParser:
    if name not in PARSERS:
        raise ValueError(f"--reasoning-parser must be one of {', '.join(sorted(PARSERS))}")
    return PARSERS[name]


def _safe_end(text: str, marker: str) -> int:
    """How much of `text` cannot be the start of `marker` (a tail that could is held)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return len(text) - k
    return len(text)


@dataclass(slots=True)
class ReasoningStream:
    """One streamed choice: each delta's reasoning part and content part."""

    parser: ReasoningParser
    text: str = ""
    phase: str = "start"  # start | reasoning | content
    sent: int = 0  # characters of `text` handed out

    def feed(self, delta: str, final: bool) -> tuple[str, str]:
        """(reasoning, content) to stream for this delta."""
        self.text += delta
        reasoning = content = ""
        while True:
            rest = self.text[self.sent :]
            if self.phase == "start":
                body = rest.lstrip()
                if body.startswith(START):
                    self.sent += len(rest) - len(body) + len(START)
                    self.phase = "reasoning"
                elif START.startswith(body) and body and not final:
                    return reasoning, content  # may still open: wait
                elif not body and not final:
                    return reasoning, content
                else:
                    self.phase = "reasoning" if self.parser.opened_by_template else "content"
                continue
            if self.phase == "reasoning":
                at = rest.find(END)
                if at >= 0:
                    reasoning += rest[:at]
                    self.sent += at + len(END)
                    self.phase = "content"
                    continue
                upto = len(rest) if final else _safe_end(rest, END)
                reasoning += rest[:upto]
                self.sent += upto
                return reasoning, content
            content += rest
            self.sent += len(rest)
            return reasoning, content


def reasoning_chunks(parser: ReasoningParser, inner):
    """Wrap a chat chunk renderer: reasoning goes out as `reasoning` (and
    `reasoning_content`) deltas, the content through `inner`."""
    states: dict[int, ReasoningStream] = {}

    def render(choice, chunk: GenerationChunk):
        state = states.setdefault(choice.index, ReasoningStream(parser))
        reasoning, content = state.feed(chunk.text, chunk.finish_reason is not None)
        events = []
        if reasoning:
            delta = {"reasoning": reasoning, "reasoning_content": reasoning}
            events.append({"index": choice.index, "delta": delta, "logprobs": None,
                           "finish_reason": None})  # fmt: skip
        rendered = inner(choice, dataclasses.replace(chunk, text=content))
        events += rendered if isinstance(rendered, list) else [rendered]
        return [e for e in events if e is not None] or None

    return render
