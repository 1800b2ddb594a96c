"""vLLM's `vllm serve` flags that Tandem has no counterpart for: each gets one clear line when
given (refused, or ignored where Tandem already does what the flag asks), never argparse's
usage dump. The flags Tandem has are in its parsers, with vLLM's names and meanings; the map
of both is docs/configuration.md (`flag_map_markdown`)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Absent:
    flags: tuple[str, ...]  # the long name first, then vLLM's short aliases
    reason: str
    accepts: tuple[str, ...] = ()  # values that ask for what Tandem does anyway
    switch: bool = False  # takes no value
    ignore: bool = False  # a warning, then serve on (the flag changes nothing that matters)


_SCALE_OUT = "scale out with more workers instead (--prefill-workers, --decode-workers)"
ABSENT = (
    Absent(("--tensor-parallel-size", "-tp"), f"no tensor parallelism: {_SCALE_OUT}", ("1",)),
    Absent(("--pipeline-parallel-size", "-pp"), f"no pipeline parallelism: {_SCALE_OUT}", ("1",)),
    Absent(
        ("--data-parallel-size", "-dp"), f"data parallelism is more workers: {_SCALE_OUT}", ("1",)
    ),  # fmt: skip
    Absent(("--enable-expert-parallel",), "no mixture-of-experts models", switch=True),
    Absent(
        ("--distributed-executor-backend",), "every stage is a process of its own", ignore=True
    ),  # fmt: skip
    Absent(
        ("--quantization", "-q"),
        "quantized checkpoints are not loaded (a .gguf model is dequantized once, on first use)",
    ),  # fmt: skip
    Absent(
        ("--guided-decoding-backend",),
        'vLLM\'s older flag: use --structured-outputs-config \'{"backend": "..."}\'',
    ),
    Absent(("--task",), "vLLM's older flag: use --runner and --convert", ("auto", "generate")),
    Absent(
        ("--kv-transfer-config",),
        "the prefill and decode workers hand KV blocks over "
        "themselves (NATS and shared memory); no external KV connector",
    ),  # fmt: skip
    Absent(("--cpu-offload-gb",), "weights are not offloaded", ("0",)),
    Absent(("--swap-space",), "a preempted request is recomputed, never swapped", ignore=True),
    Absent(("--load-format",), "models load from safetensors", ("auto", "safetensors")),
    Absent(("--tokenizer",), "the model folder's own tokenizer is used"),
    Absent(
        ("--revision",),
        "models are local: folders, .gguf files or the local Hugging Face cache's snapshot",
    ),  # fmt: skip
    Absent(("--tokenizer-revision",), "models are local"),
    Absent(("--download-dir",), "models are never downloaded"),
    Absent(
        ("--trust-remote-code",),
        "a model's own code is never run (Tandem implements each architecture it serves)",
        switch=True,
        ignore=True,
    ),  # fmt: skip
    Absent(("--max-logprobs",), "a request may ask for up to 20 logprobs", ("20",)),
    Absent(("--limit-mm-per-prompt",), "multimodal inputs are not supported"),
    Absent(("--enable-sleep-mode",), "sleep mode is not supported", switch=True),
    Absent(("--api-server-count",), "scale the gateway out with replicas instead", ("1",)),
    Absent(("--headless",), "the gateway is a stage of its own (`tandem gateway`)", switch=True),
    Absent(("--disable-custom-all-reduce",), "there is no all-reduce", switch=True, ignore=True),
    # What these ask for is what Tandem always does: accepted without a word.
    Absent(("--enable-chunked-prefill",), "", switch=True, accepts=("",)),
    Absent(("--disable-log-stats",), "", switch=True, accepts=("",)),
)


class _AbsentAction(argparse.Action):
    def __init__(self, option_strings, dest, absent: Absent, **kwargs) -> None:
        nargs = 0 if absent.switch else None
        super().__init__(option_strings, dest, nargs=nargs, help=argparse.SUPPRESS, **kwargs)
        self.absent = absent

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        given = "" if self.absent.switch else str(values)
        if given in self.absent.accepts:
            return
        name = self.absent.flags[0]
        shown = name if self.absent.switch else f"{name} {given}"
        if self.absent.ignore:
            print(f"{parser.prog}: ignoring {shown}: {self.absent.reason}", file=sys.stderr)
            return
        parser.error(f"{shown}: not supported by Tandem: {self.absent.reason}")


def add_absent_flags(p: argparse.ArgumentParser) -> None:
    """vLLM's flags for what Tandem lacks, hidden from --help, each a one-line answer."""
    for absent in ABSENT:
        p.add_argument(
            *absent.flags,
            action=_AbsentAction,
            absent=absent,
            dest=f"vllm_{absent.flags[0][2:].replace('-', '_')}",
            default=None,
        )


# `vllm serve` flags that Tandem takes with vLLM's meaning (a test checks each is a flag of
# `tandem serve`); Tandem's other flags are its own.
SAME_AS_VLLM = (
    "--model", "--served-model-name", "--host", "--port", "--api-key", "--uvicorn-log-level",
    "--root-path", "--allowed-origins", "--allowed-methods", "--allowed-headers",
    "--allow-credentials", "--ssl-keyfile", "--ssl-certfile", "--ssl-ca-certs",
    "--disable-fastapi-docs", "--enable-log-requests", "--disable-log-requests", "--max-log-len",
    "--chat-template", "--config", "--dtype", "--max-model-len", "--max-num-seqs",
    "--max-num-batched-tokens", "--block-size", "--num-gpu-blocks-override",
    "--gpu-memory-utilization", "--enable-prefix-caching", "--scheduling-policy", "--seed",
    "--logprobs-mode", "--logits-processors", "--otlp-traces-endpoint",
    "--structured-outputs-config", "--enable-auto-tool-choice", "--tool-call-parser",
    "--tool-parser-plugin", "--reasoning-parser", "--enable-prompt-tokens-details",
    "--enforce-eager", "--cuda-graph-sizes", "--runner", "--convert", "--pooler-config",
    "--kv-cache-dtype", "--calculate-kv-scales", "--speculative-config", "--enable-lora",
    "--lora-modules", "--max-loras", "--max-lora-rank", "--max-cpu-loras",
)  # fmt: skip


def flag_map_markdown(serve: argparse.ArgumentParser) -> str:
    """The flag map of docs/configuration.md: every flag of `tandem serve` (vLLM's meaning, or
    Tandem's own), then vLLM's flags without a counterpart and what they get."""
    rows = ["| flag | default | vLLM | what it does |", "|---|---|---|---|"]
    for action in serve._actions:
        flag = next((s for s in action.option_strings if s.startswith("--")), None)
        if flag is None or action.help == argparse.SUPPRESS or flag == "--help":
            continue
        names = ", ".join(f"`{s}`" for s in action.option_strings)
        kind = "same" if flag in SAME_AS_VLLM else "Tandem's"
        default = action.default
        if default is None or default is False or isinstance(action, argparse._StoreFalseAction):
            shown = ""
        elif default is True:
            shown = "on"
        else:
            shown = f"`{default}`"
        text = " ".join((action.help or "").split()).replace("|", "\\|")
        rows.append(f"| {names} | {shown} | {kind} | {text} |")
    rows += ["", "| vLLM flag | in Tandem |", "|---|---|"]
    for absent in ABSENT:
        names = ", ".join(f"`{f}`" for f in absent.flags)
        if absent.accepts == ("",):
            what = "accepted: Tandem always does this"
        elif absent.ignore:
            what = f"ignored with a warning: {absent.reason}"
        elif absent.accepts:
            allowed = " or ".join(f"`{v}`" for v in absent.accepts)
            what = f"{allowed} accepted; else refused: {absent.reason}"
        else:
            what = f"refused: {absent.reason}"
        rows.append(f"| {names} | {what} |")
    return "\n".join(rows) + "\n"
