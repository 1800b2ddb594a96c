"""The two backends: checking a spec (parsing only, no token masks: the tokenizer stage and
the in-process client do it before a request is accepted) and compiling it for a tokenizer
(each worker, on its grammar thread), and the matchers that track a request's tokens.

xgrammar compiles a grammar once into per-state token masks; llguidance (guidance) computes
masks lazily and enforces more of JSON Schema (`multipleOf`, `patternProperties`). Under
`auto`, a spec xgrammar would accept but not enforce (vLLM's list of such keywords) or cannot
parse goes to guidance."""

from __future__ import annotations

import dataclasses
import json
import re

from tandem.engine.structured_output.params import (
    StructuredOutputsConfig,
    StructuredOutputsParams,
)

# String formats xgrammar's JSON Schema converter enforces (others it ignores).
XGRAMMAR_FORMATS = frozenset({
    "email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid",
    "uri", "uri-reference", "uri-template", "json-pointer", "relative-json-pointer",
})  # fmt: skip
# JSON separators when whitespace is not free: json.dumps's, as xgrammar uses them.
ITEM_SEPARATOR, KEY_SEPARATOR = ", ", ": "


class SpecError(ValueError):
    """A spec no backend can serve; the message names the request parameter."""


def xgrammar_unenforced(schema) -> list[str]:
    """The keywords of a JSON schema that xgrammar would accept and not enforce."""
    found: list[str] = []

    def walk(node) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict):
            return
        kind = node.get("type")
        types = {kind} if isinstance(kind, str) else set(kind or ())
        if types & {"integer", "number"} and "multipleOf" in node:
            found.append("multipleOf")
        if "array" in types:
            found.extend(k for k in ("uniqueItems", "contains", "minContains", "maxContains")
                         if k in node)  # fmt: skip
        if "string" in types:
            if "format" in node and node["format"] not in XGRAMMAR_FORMATS:
                found.append(f"format {node['format']!r}")
            if ("pattern" in node or "format" in node) and (
                "minLength" in node or "maxLength" in node
            ):
                found.append("minLength/maxLength with a pattern or format")
        if "object" in types and isinstance(node.get("patternProperties"), dict):
            if "properties" in node or len(node["patternProperties"]) > 1:
                found.append("patternProperties with properties")
        for value in node.values():
            walk(value)

    walk(schema)
    return found


def is_lark(grammar: str) -> bool:
    """EBNF (GBNF) rules read `name ::= ...`; Lark's `name: ...`."""
    return "::=" not in grammar


def choice_ebnf(choices) -> str:
    """EBNF for "exactly one of these strings"."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def _json_schema(text: str, param: str):
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"{param} must be a JSON schema: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise SpecError(f"{param} must be a JSON schema (an object)")
    from jsonschema import exceptions, validators

    try:
        validators.validator_for(schema).check_schema(schema)
    except exceptions.SchemaError as e:
        raise SpecError(f"{param} must be a valid JSON schema: {e.message}") from None
    return schema


def _structural_tag(text: str, param: str) -> dict:
    try:
        tag = json.loads(text)
        if not isinstance(tag, dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise SpecError(f"{param} must be a structural tag (a JSON object): {e}") from None
    return tag


# -- xgrammar --------------------------------------------------------------------------------


def _xgrammar_grammar(p: StructuredOutputsParams, param: str):
    """The spec as an xgrammar Grammar (parsing only). SpecError when it cannot be one."""
    import xgrammar as xgr

    kind = p.kind
    try:
        if kind == "json":
            schema = _json_schema(p.json, param)
            unenforced = xgrammar_unenforced(schema)
            if unenforced:
                raise SpecError(
                    f"{param} uses JSON Schema keywords xgrammar does not enforce "
                    f"({', '.join(dict.fromkeys(unenforced))})"
                )
            return xgr.Grammar.from_json_schema(p.json, any_whitespace=p.any_whitespace)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema(
                '{"type": "object"}', any_whitespace=p.any_whitespace
            )
        if kind == "regex":
            if "\x00" in p.regex:
                raise SpecError(f"{param} regex must not contain a NUL character")
            return xgr.Grammar.from_regex(p.regex)
        if kind == "choice":
            return xgr.Grammar.from_ebnf(choice_ebnf(p.choice))
        if kind == "grammar":
            if is_lark(p.grammar):
                return xgr.Grammar.from_lark(p.grammar)
            return xgr.Grammar.from_ebnf(p.grammar)
        tag = _structural_tag(p.structural_tag, param)
        if "structures" in tag:
            items = [
                xgr.StructuralTagItem(
                    begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"]
                )  # fmt: skip
                for s in tag["structures"]
            ]
            return xgr.Grammar.from_structural_tag(items, tag["triggers"])
        return xgr.Grammar.from_structural_tag(p.structural_tag)
    except SpecError:
        raise
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise SpecError(f"{param} {_kind_name(kind)} is invalid: {_short(e)}") from None


def xgrammar_compile(compiler, p: StructuredOutputsParams):
    """A CompiledGrammar for the worker's tokenizer (its token masks precomputed)."""
    kind = p.kind
    if kind == "json":
        return compiler.compile_json_schema(p.json, any_whitespace=p.any_whitespace)
    if kind == "json_object":
        return compiler.compile_json_schema('{"type": "object"}', any_whitespace=p.any_whitespace)
    return compiler.compile_grammar(_xgrammar_grammar(p, "structured_outputs"))


class XgrammarMatcher:
    """A request's position in an xgrammar grammar."""

    __slots__ = ("matcher", "terminated")

    def __init__(self, matcher) -> None:
        self.matcher = matcher
        self.terminated = False

    @classmethod
    def new(cls, compiled) -> XgrammarMatcher:
        import xgrammar as xgr

        return cls(xgr.GrammarMatcher(compiled))

    def accept(self, token_id: int) -> bool:
        if self.terminated:
            return True
        ok = self.matcher.accept_token(token_id)
        self.terminated = self.matcher.is_terminated()
        return ok

    def fill(self, bitmask, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def rollback(self, num_tokens: int) -> None:
        self.matcher.rollback(num_tokens)
        self.terminated = self.matcher.is_terminated()

    def fork(self) -> XgrammarMatcher:
        copy = XgrammarMatcher(self.matcher.fork())
        copy.terminated = self.terminated
        return copy


# -- guidance (llguidance) --------------------------------------------------------------------


def guidance_grammar(p: StructuredOutputsParams, param: str = "structured_outputs") -> str:
    """The spec as llguidance's serialized grammar; SpecError when it is not valid."""
    import llguidance

    kind = p.kind
    defaults = {"whitespace_flexible": p.any_whitespace}
    if not p.any_whitespace:
        defaults |= {"item_separator": ITEM_SEPARATOR, "key_separator": KEY_SEPARATOR}
    try:
        if kind == "json":
            _json_schema(p.json, param)
            grammar = llguidance.LLMatcher.grammar_from_json_schema(p.json, defaults=defaults)
        elif kind == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                '{"type": "object"}', defaults=defaults
            )
        elif kind == "regex":
            grammar = llguidance.grammar_from("regex", p.regex)
        elif kind == "choice":
            grammar = llguidance.grammar_from("choice", list(p.choice))
        elif kind == "grammar":
            text = p.grammar if is_lark(p.grammar) else llguidance.gbnf_to_lark(p.grammar)
            grammar = llguidance.grammar_from("lark", text)
        else:
            raise SpecError(f"{param} structural_tag needs the xgrammar backend")
    except SpecError:
        raise
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise SpecError(f"{param} {_kind_name(kind)} is invalid: {_short(e)}") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    problems = messages if is_error else [m for m in messages if "nimplemented" in m]
    if problems:
        raise SpecError(f"{param} {_kind_name(kind)} is not supported: {_short(problems[0])}")
    return grammar


class GuidanceMatcher:
    """A request's position in an llguidance grammar."""

    __slots__ = ("matcher", "eos_token_id", "terminated")

    def __init__(self, matcher, eos_token_id: int | None) -> None:
        self.matcher = matcher
        self.eos_token_id = eos_token_id
        self.terminated = False

    @classmethod
    def new(cls, tokenizer, grammar: str, eos_token_id: int | None) -> GuidanceMatcher:
        import llguidance

        matcher = llguidance.LLMatcher(tokenizer, grammar)
        error = matcher.get_error()
        if error:
            raise SpecError(f"structured_outputs is not supported: {_short(error)}")
        return cls(matcher, eos_token_id)

    def accept(self, token_id: int) -> bool:
        if self.terminated:
            return True
        if token_id == self.eos_token_id and self.matcher.is_accepting():
            self.terminated = True
            return True
        ok = self.matcher.consume_token(token_id)
        self.terminated = self.matcher.is_stopped()
        return ok and not self.matcher.is_error()

    def fill(self, bitmask, row: int) -> None:
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self.matcher, bitmask, row)

    def rollback(self, num_tokens: int) -> None:
        self.matcher.rollback(num_tokens)
        self.terminated = self.matcher.is_stopped()

    def fork(self) -> GuidanceMatcher:
        copy = GuidanceMatcher(self.matcher.deep_copy(), self.eos_token_id)
        copy.terminated = self.terminated
        return copy


# -- checking a request's spec ----------------------------------------------------------------


def check(p: StructuredOutputsParams, config: StructuredOutputsConfig,
          param: str = "structured_outputs") -> StructuredOutputsParams:  # fmt: skip
    """The spec with its backend resolved and the server's whitespace rule, once it parses
    with that backend. SpecError (naming `param`) when no allowed backend can serve it."""
    p = dataclasses.replace(p, any_whitespace=not config.disable_any_whitespace)
    backend = p.backend if p.backend != "auto" else config.backend
    if backend == "guidance":
        guidance_grammar(p, param)
        return dataclasses.replace(p, backend="guidance")
    try:
        _xgrammar_grammar(p, param)
        return dataclasses.replace(p, backend="xgrammar")
    except SpecError as xgrammar_error:
        if backend == "xgrammar" or config.disable_fallback or p.kind == "structural_tag":
            raise
        try:
            guidance_grammar(p, param)
        except SpecError as guidance_error:
            if "does not enforce" not in str(xgrammar_error):
                raise xgrammar_error from None  # the spec's own fault: one message
            why = str(guidance_error).removeprefix(param + " ")
            raise SpecError(
                f"{xgrammar_error}, and guidance cannot serve it either: {why}"
            ) from None
        return dataclasses.replace(p, backend="guidance")


def _kind_name(kind: str) -> str:
    return {"json": "JSON schema", "json_object": "JSON object", "choice": "choice list",
            "structural_tag": "structural tag"}.get(kind, kind)  # fmt: skip


def _short(error) -> str:
    """A backend's error without its source location prefix, on one line."""
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(error).strip())
    return " ".join(text.split())[:500]
