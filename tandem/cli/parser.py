"""The parser under every `tandem` command: one-line errors, environment defaults read only by
the subcommand that uses them, `--config FILE` (YAML, as vLLM's), and subcommands whose
modules load only when they run."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class EnvDefault:
    """A flag whose default comes from an environment variable, then `fallback`."""

    dest: str
    var: str
    convert: Callable[[str], object]
    fallback: object
    what: str  # "a port number": for the error a malformed value gets

    def apply(self, ns: argparse.Namespace, parser: Parser) -> None:
        if getattr(ns, self.dest, None) is not None:
            return
        raw = os.environ.get(self.var, "")
        if not raw:
            setattr(ns, self.dest, self.fallback)
            return
        try:
            setattr(ns, self.dest, self.convert(raw))
        except ValueError:
            hint = ""
            if raw.startswith("tcp://"):  # a Kubernetes Service link: TANDEM_PORT=tcp://IP:PORT
                hint = (
                    "; Kubernetes sets it for a Service of that name: set enableServiceLinks: "
                    "false on the pod"
                )
            flag = "--" + self.dest.replace("_", "-")
            parser.error(f"${self.var} is {raw!r}, not {self.what}{hint}; or pass {flag}")


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(text)
    return value


def json_list(text: str) -> list[str]:
    """vLLM's form for the CORS flags: a JSON list, e.g. '["https://a.example"]'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text!r}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, environment defaults (`env_option`), checks run after
    parsing (`after`), `--config` files, and `fill`: "module:function" that adds this
    subcommand's flags when it is the one run (so `tandem --help` imports no benchmark)."""

    def __init__(self, *args, fill: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.env_defaults: list[EnvDefault] = []
        self.after: list[Callable[[argparse.Namespace, Parser], None]] = []
        self.fill = fill

    def error(self, message: str) -> None:  # never argparse's usage dump
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def parse_known_args(self, args=None, namespace=None):
        if self.fill:
            module, name = self.fill.split(":")
            self.fill = None
            getattr(importlib.import_module(module), name)(_Into(self))
        args = list(sys.argv[1:] if args is None else args)
        if "--config" in self._option_string_actions:
            args = self._with_config(args)
        ns, extra = super().parse_known_args(args, namespace)
        for default in self.env_defaults:
            default.apply(ns, self)
        for check in self.after:
            check(ns, self)
        return ns, extra

    def env_option(
        self,
        flag: str,
        var: str,
        fallback: object,
        convert: Callable[[str], object] = str,
        what: str = "a value",
        help: str = "",
        group: argparse._ActionsContainer | None = None,
    ) -> None:
        """`flag`, defaulting to $var, else `fallback` (read after parsing, by this
        subcommand only; a malformed value is a one-line error naming the variable)."""
        shown = "none" if fallback is None else fallback
        text = f"{help} (default: ${var}, else {shown})".lstrip()
        action = (group or self).add_argument(flag, default=None, type=convert, help=text)
        self.env_defaults.append(EnvDefault(action.dest, var, convert, fallback, what))

    def _with_config(self, args: list[str]) -> list[str]:
        """`--config FILE`: the file's keys become flags placed before the command line's, so
        a flag given on the command line wins (as vLLM's)."""
        if "--config" not in args and not any(a.startswith("--config=") for a in args):
            return args
        rest, path = [], None
        it = iter(args)
        for a in it:
            if a == "--config":
                path = next(it, None)
            elif a.startswith("--config="):
                path = a.split("=", 1)[1]
            else:
                rest.append(a)
        if not path:
            self.error("--config needs a YAML file")
        return [*config_argv(self, Path(path)), *rest]


def config_argv(parser: Parser, path: Path) -> list[str]:
    """A YAML mapping of flag names (`max-model-len` or `max_model_len`) to values, as flags."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        parser.error(f"--config {path}: {e}")
    if data is None:
        return []
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values")
    argv: list[str] = []
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        action = parser._option_string_actions.get(flag)
        if action is None or flag == "--config":
            parser.error(f"--config {path}: unknown key {key!r}")
        if action.nargs == 0:  # a switch: true sets it; false leaves it (or says --no-...)
            negative = f"--no-{flag[2:]}"
            if value:
                argv.append(flag)
            elif negative in action.option_strings:
                argv.append(negative)
        elif isinstance(value, list):
            argv += [flag, *(str(v) for v in value)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


class _Into:
    """Stands for a subparsers action whose `add_parser` hands back a parser made earlier:
    a lazy subcommand's module adds its flags to it as it would to a new one."""

    def __init__(self, parser: Parser) -> None:
        self.parser = parser

    def add_parser(self, name: str, **kwargs) -> Parser:
        if kwargs.get("description"):
            self.parser.description = kwargs["description"]
        return self.parser


def lazy_subcommand(sub: argparse._SubParsersAction, name: str, help: str, fill: str) -> Parser:
    """A subcommand whose flags `fill` ("module:function") adds when it runs."""
    return sub.add_parser(name, help=help, fill=fill)
