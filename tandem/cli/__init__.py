"""`tandem`: serve a model (vLLM's command line), run one stage of a cluster, prepare the
default model, build the CPU kernels, benchmark, plan, read a trace."""

from __future__ import annotations

import argparse
import signal
import sys

from tandem.cli import commands as cmd
from tandem.cli.flags import add_serve_parser, add_stage_parsers
from tandem.cli.parser import Parser, lazy_subcommand

STAGES = ("gateway", "tokenizer", "scheduler", "prefill", "decode")


def build_parser() -> Parser:
    parser = Parser(prog="tandem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_serve_parser(sub)
    add_stage_parsers(sub)

    tr = sub.add_parser("trace", help="print one request's spans as a waterfall")
    tr.add_argument("request_id", help="the id the API returned (cmpl-..., chatcmpl-...)")
    tr.add_argument("--trace-file", required=True, help="the file given to `tandem serve`")
    tr.set_defaults(func=cmd.cmd_trace)

    model = sub.add_parser("model", help="model files").add_subparsers(
        dest="action", required=True, parser_class=Parser
    )
    prep = model.add_parser("prepare", help="convert the packaged default model once")
    prep.add_argument(
        "name", nargs="?", default=None,
        help="a packaged model (all-MiniLM-L6-v2: its folder is printed); default: the chat "
        "model, converted from its GGUF once",
    )  # fmt: skip
    prep.add_argument("--force", action="store_true")
    prep.set_defaults(func=cmd.cmd_model_prepare)

    kernels = sub.add_parser("kernels", help="the C++ CPU kernels").add_subparsers(
        dest="action", required=True, parser_class=Parser
    )
    build = kernels.add_parser("build", help="build them for this machine once (~30 s)")
    build.set_defaults(func=cmd.cmd_kernels_build)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(
        dest="kind", required=True, parser_class=Parser
    )
    off = bench.add_parser("offline", help="the engine against Hugging Face generate")
    off.add_argument("--model", default=None)
    off.add_argument("--dtype", default="auto")
    off.add_argument("--num-prompts", type=int, default=32)
    off.add_argument("--input-len", type=int, default=128)
    off.add_argument("--output-len", type=int, default=128)
    off.add_argument("--seed", type=int, default=0)
    off.add_argument("--skip-hf", action="store_true")
    off.add_argument("--json", default=None, help="write the figures to this file")
    off.add_argument("--torch-threads", type=int, default=None)
    off.set_defaults(func=cmd.cmd_bench_offline)
    lazy_subcommand(bench, "serve", "online serving load: disaggregated vs colocated",
                    "tandem.bench.serve:add_bench_serve_parser")  # fmt: skip
    lazy_subcommand(bench, "embed", "embeddings: Tandem against sentence-transformers",
                    "tandem.bench.embed:add_bench_embed_parser")  # fmt: skip
    lazy_subcommand(bench, "peer", "Tandem against llama.cpp's server, vLLM's client",
                    "tandem.bench.peer:add_bench_peer_parser")  # fmt: skip
    lazy_subcommand(bench, "profile", "one worker's step times, for `tandem plan`",
                    "tandem.bench.profile:add_bench_profile_parser")  # fmt: skip
    lazy_subcommand(sub, "plan", "how many prefill and decode workers meet TTFT/ITL SLOs",
                    "tandem.planner.command:add_plan_parser")  # fmt: skip
    return parser


def _stage_name(args: argparse.Namespace) -> str:
    """The process's `service.name` in traces and `stage` in JSON logs."""
    if args.command == "serve":
        return "gateway" if args.colocated else "launcher"
    return args.command


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # SIGINT means "stop now" between Tandem's processes (the launcher to its stages, the
    # bench to its server). A shell starts background jobs with SIGINT ignored, and children
    # inherit that: every stage then sat out its stop timeout before being killed.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = build_parser().parse_args(argv)
    from tandem.services.observability.logs import setup_logging

    stage = _stage_name(args)
    setup_logging(getattr(args, "log_format", "text"), stage)
    traced = False
    if stage in STAGES:
        from tandem.services.observability.tracing import setup_tracing

        traced = setup_tracing(
            stage, args.otlp_traces_endpoint, args.trace_file, args.trace_sample_ratio
        )
        signal.signal(signal.SIGTERM, _interrupt)  # exit through `finally`: spans flushed
    try:
        return args.func(args)
    except ValueError as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C reaches every stage of `tandem serve`: a quiet exit
        return 0
    finally:
        if traced:
            from tandem.services.observability.tracing import shutdown_tracing

            shutdown_tracing()
