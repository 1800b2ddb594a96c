"""What a request asks to be constrained by, and the server's structured-outputs config,
with vLLM's names. Pure data: it travels with the request on the wire."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

from tandem.utils import json_flag_fields

BACKENDS = ("auto", "xgrammar", "guidance")
# What opens and closes a reasoning parser's thinking (`--reasoning-parser`).
REASONING_MARKERS = {"deepseek_r1": ("<think>", "</think>"), "qwen3": ("<think>", "</think>")}


@dataclass(frozen=True, slots=True)
class StructuredOutputsParams:
    """One constraint (vLLM's `structured_outputs` request object). `json`: a JSON schema as
    JSON text; `choice`: the output is exactly one of these strings; `grammar`: EBNF (GBNF)
    or Lark; `structural_tag`: xgrammar's structural tag as JSON text. `backend` is resolved
    when the request is checked (never `auto` past that point) and `any_whitespace` comes
    from the server's config: both travel, so every worker compiles the same grammar.
    `reasoning_parser` (a chat request to a server with `--reasoning-parser`): the
    constraint applies once the reasoning ends, as in vLLM (the thinking is free text)."""

    json: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False
    structural_tag: str | None = None
    backend: str = "auto"
    any_whitespace: bool = False
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [name for name in KINDS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs must set exactly one of json, regex, choice, grammar, "
                f"json_object, structural_tag (got {', '.join(given) or 'none'})"
            )
        if self.choice is not None and (
            not self.choice or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError("structured_outputs.choice must be a non-empty list of strings")
        for name in ("json", "regex", "grammar", "structural_tag"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.backend not in BACKENDS:
            raise ValueError(f"structured_outputs backend must be one of {', '.join(BACKENDS)}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_MARKERS:
            raise ValueError(f"unknown reasoning parser {self.reasoning_parser!r}")

    @property
    def kind(self) -> str:
        return next(name for name in KINDS if getattr(self, name) not in (None, False))

    @property
    def spec(self) -> str:
        """The constraint as one string (choices as JSON)."""
        value = getattr(self, self.kind)
        if self.kind == "choice":
            return json.dumps(list(value))
        return "" if value is True else value

    @property
    def key(self) -> tuple:
        """What a compiled grammar is cached under (with the tokenizer, fixed per worker)."""
        return (self.backend, self.kind, self.spec, self.any_whitespace)


KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass(frozen=True, slots=True)
class StructuredOutputsConfig:
    """The server's `--structured-outputs-config` (vLLM's JSON): `backend` auto (xgrammar,
    falling back to guidance for what xgrammar cannot enforce), xgrammar or guidance;
    `disable_any_whitespace` (here true by default: JSON comes out in one fixed layout, so a
    small model cannot spend its tokens on whitespace); `disable_fallback`: auto never falls
    back; `enable_in_reasoning`: with a reasoning parser, constrain the reasoning too
    (by default the constraint starts where the reasoning ends)."""

    backend: str = "auto"
    disable_any_whitespace: bool = True
    disable_fallback: bool = False
    enable_in_reasoning: bool = False

    @classmethod
    def parse(cls, text: str | None) -> StructuredOutputsConfig:
        """From the flag's JSON (or `backend=...`-free shorthand: just a backend's name)."""
        if not text:
            return cls()
        if text.strip() in BACKENDS:
            return cls(backend=text.strip())
        config = cls(**json_flag_fields(text, cls, "--structured-outputs-config"))
        if config.backend not in BACKENDS:
            raise ValueError(f"--structured-outputs-config backend must be one of {BACKENDS}")
        return config

    def to_json(self) -> str:
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)})
