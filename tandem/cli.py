"""`tandem` command line: serve, model prepare, bench."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import torch

from tandem.engine.args import add_engine_args, engine_config, resolve_model
from tandem.engine.config import SchedulingPolicy
from tandem.services.observability.logs import setup_logging
from tandem.services.observability.tracing import setup_tracing, shutdown_tracing

logger = logging.getLogger("tandem")


def add_router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--router",
        default="kv-aware",
        choices=["kv-aware", "least-loaded", "round-robin"],
        help="how the scheduler picks workers: kv-aware weighs cached prefix against load",
    )
    p.add_argument(
        "--kv-overlap-weight",
        type=float,
        default=1.0,
        help="kv-aware: how many tokens of load one cached prompt token is worth",
    )


def add_queue_args(p: argparse.ArgumentParser) -> None:
    """The scheduler's queue bounds: past them a new request gets 503 with Retry-After."""
    p.add_argument("--max-num-queued-requests", type=int, default=None, help="default: no bound")
    p.add_argument("--max-num-queued-tokens", type=int, default=None, help="default: no bound")


def add_api_args(p: argparse.ArgumentParser) -> None:
    """What guards the REST API."""
    p.add_argument(
        "--api-key",
        default=os.environ.get("TANDEM_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1/*, /tokenize, /detokenize and "
        "/reset_prefix_cache (default: $TANDEM_API_KEY, else none)",
    )
    p.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=8 << 20,
        help="larger request bodies get 413",
    )


def add_observability_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--otlp-traces-endpoint",
        default=os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        help="export every request's trace over OTLP/HTTP (e.g. http://localhost:4318/v1/traces)",
    )
    p.add_argument(
        "--trace-file",
        default=os.environ.get("TANDEM_TRACE_FILE"),
        help="append every stage's spans to this file, one OTLP JSON line per span",
    )
    p.add_argument(
        "--trace-sample-ratio",
        type=float,
        default=1.0,
        help="fraction of requests traced (the gateway decides for every stage)",
    )
    p.add_argument("--log-format", default="text", choices=["text", "json"])


def add_stage_args(p: argparse.ArgumentParser, drains: bool = False) -> None:
    """What an orchestrator needs of a stage that has no HTTP port of its own."""
    port = os.environ.get("TANDEM_HEALTH_PORT")
    p.add_argument(
        "--health-port",
        type=int,
        default=int(port) if port else None,
        help="serve /health, /ready and /metrics on this port, all interfaces (default: "
        "$TANDEM_HEALTH_PORT, else none)",
    )
    if drains:
        p.add_argument(
            "--shutdown-timeout",
            type=float,
            default=30.0,
            help="seconds a SIGTERM'd worker takes to finish its requests before handing the "
            "rest back to the scheduler",
        )


def cmd_serve(args: argparse.Namespace) -> int:
    args.model = resolve_model(args.model)
    if not args.colocated:
        from tandem.services.launcher import serve_cluster

        return serve_cluster(args)
    from tandem.engine.inproc_client import InProcessEngineClient

    client = InProcessEngineClient(
        engine_config(args), args.max_num_queued_requests, args.max_num_queued_tokens
    )
    return _run_gateway(args, client)


def _run_gateway(args: argparse.Namespace, client) -> int:
    import uvicorn

    from tandem.services.gateway.app import build_app

    name = args.served_model_name or Path(args.model.rstrip("/")).name
    app = build_app(client, name, args.model, args.api_key, args.max_request_body_bytes)
    logger.info("serving %s as %r on http://%s:%d", args.model, name, args.host, args.port)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.uvicorn_log_level,
        timeout_graceful_shutdown=getattr(args, "shutdown_timeout", None),
    )
    return 0


def run_stage(main) -> None:
    """asyncio.run for a stage's coroutine, with a bounded exit: a task some library leaves
    running (the NATS client retrying a server that stopped first, as when a whole
    deployment stops at once) gets 3 s after cancellation, then the process exits anyway."""
    runner = asyncio.Runner()
    try:
        runner.run(main)
    finally:
        loop = runner.get_loop()
        tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in tasks:
            task.cancel()
        stuck = set()
        if tasks:
            _, stuck = loop.run_until_complete(asyncio.wait(tasks, timeout=3.0))
        if stuck:  # closing the runner would wait for them again
            logger.warning("%d task(s) did not stop: exiting without them", len(stuck))
        else:
            runner.close()


def cmd_gateway(args: argparse.Namespace) -> int:
    from tandem.services.gateway.cluster_client import ClusterEngineClient

    args.model = resolve_model(args.model)
    return _run_gateway(args, ClusterEngineClient(args.nats_url, args.tokenizer_url))


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from tandem.services.tokenizer.service import serve

    address = f"{args.host}:{args.port}"
    run_stage(serve(resolve_model(args.model), address, args.nats_url, args.health_port))
    return 0


def cmd_scheduler(args: argparse.Namespace) -> int:
    from tandem.services.scheduler.core import Router
    from tandem.services.scheduler.service import serve

    policy = SchedulingPolicy(args.scheduling_policy)
    router = Router(args.router)
    run_stage(
        serve(
            args.nats_url,
            args.redis_url,
            policy,
            args.worker_timeout,
            router,
            args.kv_overlap_weight,
            args.health_port,
            args.max_num_queued_requests,
            args.max_num_queued_tokens,
            args.no_worker_timeout,
        )
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from tandem.services.worker.shell import run_worker, worker_id_for

    args.model = resolve_model(args.model)
    if args.command == "prefill":
        from tandem.services.prefill.service import PrefillWorker as worker_cls
    else:
        from tandem.services.decode.service import DecodeWorker as worker_cls
    worker_id = worker_id_for(args.command, args.worker_id)
    config = engine_config(args)
    run_stage(
        run_worker(
            worker_cls,
            config,
            args.nats_url,
            worker_id,
            args.health_port,
            args.shutdown_timeout,
        )
    )
    return 0


def cmd_model_prepare(args: argparse.Namespace) -> int:
    from tandem.model_prep import prepare_default_model

    print(prepare_default_model(force=args.force))
    return 0


def cmd_kernels_build(args: argparse.Namespace) -> int:
    from tandem.kernels.cpu import build_directory, load_cpu_kernels

    if not load_cpu_kernels():
        print("CPU kernels unavailable: attention runs through torch (see the warning above)")
        return 0
    print(build_directory())
    return 0


def cmd_bench_offline(args: argparse.Namespace) -> int:
    from tandem.bench.offline import OfflineBenchArgs, run

    run(
        OfflineBenchArgs(
            model=resolve_model(args.model),
            num_prompts=args.num_prompts,
            input_len=args.input_len,
            output_len=args.output_len,
            dtype=args.dtype,
            seed=args.seed,
            skip_hf=args.skip_hf,
            json_path=args.json,
        )
    )
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from tandem.services.observability.tracing import read_spans, request_trace, waterfall

    spans = request_trace(read_spans(args.trace_file), args.request_id)
    if not spans:
        print(f"no spans of request {args.request_id} in {args.trace_file}", file=sys.stderr)
        return 1
    print(waterfall(spans))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible server")
    add_engine_args(serve)
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument("--host", default=os.environ.get("TANDEM_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("TANDEM_PORT", "8000")))
    serve.add_argument("--uvicorn-log-level", default="warning")
    serve.add_argument(
        "--colocated",
        action="store_true",
        help="one process: the gateway with the engine in it (no NATS, no Redis)",
    )
    add_router_args(serve)
    add_queue_args(serve)
    add_api_args(serve)
    add_observability_args(serve)
    serve.add_argument("--prefill-workers", type=int, default=1)
    serve.add_argument("--decode-workers", type=int, default=1)
    serve.add_argument(
        "--worker-placement",
        default="auto",
        choices=["auto", "pinned", "shared"],
        help="pinned: each worker on its own cores; shared: every worker on every core; "
        "auto: pinned when there are as many cores as workers",
    )
    serve.set_defaults(func=cmd_serve)

    nats_url = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
    gateway = sub.add_parser("gateway", help="the REST gateway of a cluster")
    gateway.add_argument("--model", default=None, help="the model folder (its name is served)")
    gateway.add_argument("--served-model-name", default=None)
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=int, default=8000)
    gateway.add_argument("--nats-url", default=nats_url)
    gateway.add_argument("--tokenizer-url", default="127.0.0.1:50051", help="host:port (gRPC)")
    gateway.add_argument("--uvicorn-log-level", default="warning")
    gateway.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds a SIGTERM'd gateway waits for open requests",
    )
    add_api_args(gateway)
    add_observability_args(gateway)
    gateway.set_defaults(func=cmd_gateway)

    tok = sub.add_parser("tokenizer", help="the tokenizer stage (gRPC, and the text stream)")
    tok.add_argument("--model", default=None)
    tok.add_argument("--host", default="127.0.0.1")
    tok.add_argument("--port", type=int, default=50051)
    tok.add_argument("--nats-url", default=nats_url)
    add_stage_args(tok)
    add_observability_args(tok)
    tok.set_defaults(func=cmd_tokenizer)

    sched = sub.add_parser("scheduler", help="the central scheduler")
    sched.add_argument("--nats-url", default=nats_url)
    sched.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"])
    sched.add_argument("--worker-timeout", type=float, default=5.0, help="seconds")
    sched.add_argument(
        "--no-worker-timeout",
        type=float,
        default=30.0,
        help="seconds without a prefill or decode worker before queued requests get 503",
    )
    sched.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL"), help="the prefix-cache index"
    )
    add_router_args(sched)
    add_queue_args(sched)
    add_stage_args(sched)
    add_observability_args(sched)
    sched.set_defaults(func=cmd_scheduler)

    for role in ("prefill", "decode"):
        worker = sub.add_parser(role, help=f"a {role} worker")
        add_engine_args(worker)
        worker.add_argument("--nats-url", default=nats_url)
        worker.add_argument("--worker-id", default=None)
        add_stage_args(worker, drains=True)
        add_observability_args(worker)
        worker.set_defaults(func=cmd_worker)

    tr = sub.add_parser("trace", help="print one request's spans as a waterfall")
    tr.add_argument("request_id", help="the id the API returned (cmpl-..., chatcmpl-...)")
    tr.add_argument("--trace-file", required=True, help="the file given to `tandem serve`")
    tr.set_defaults(func=cmd_trace)

    model = sub.add_parser("model", help="model files").add_subparsers(dest="action", required=True)
    prep = model.add_parser("prepare", help="convert the packaged default model once")
    prep.add_argument("--force", action="store_true")
    prep.set_defaults(func=cmd_model_prepare)

    kernels = sub.add_parser("kernels", help="the C++ CPU kernels")
    kernels = kernels.add_subparsers(dest="action", required=True)
    build = kernels.add_parser("build", help="build them for this machine once (~30 s)")
    build.set_defaults(func=cmd_kernels_build)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="kind", required=True)
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
    off.set_defaults(func=cmd_bench_offline)
    from tandem.bench.serve import add_bench_serve_parser

    add_bench_serve_parser(bench)
    from tandem.bench.profile import add_bench_profile_parser
    from tandem.planner import add_plan_parser

    add_bench_profile_parser(bench)
    add_plan_parser(sub)
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
    stage = _stage_name(args)
    setup_logging(getattr(args, "log_format", "text"), stage)
    threads = getattr(args, "torch_threads", None) or os.cpu_count() or 1
    torch.set_num_threads(threads)
    traced = False
    if stage in ("gateway", "tokenizer", "scheduler", "prefill", "decode"):
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
            shutdown_tracing()


if __name__ == "__main__":
    sys.exit(main())
