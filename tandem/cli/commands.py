"""What each `tandem` subcommand runs. Each imports what it uses when it runs: `tandem
gateway` loads no torch, `tandem --help` no benchmark."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from tandem.model_source import resolve_model, served_name

logger = logging.getLogger("tandem")


def set_torch_threads(args: argparse.Namespace) -> None:
    """torch's intra-op threads: --torch-threads, else every core."""
    import torch

    torch.set_num_threads(getattr(args, "torch_threads", None) or os.cpu_count() or 1)


def cmd_serve(args: argparse.Namespace) -> int:
    """`tandem serve [MODEL]`: the whole cluster (the launcher), or one process with
    --colocated. The model is served under the name it was given by."""
    args.served_model_name = args.served_model_name or [served_name(args.model)]
    args.model = resolve_model(args.model)
    if args.chat_template:
        from tandem.engine.tokenizer import read_chat_template

        read_chat_template(args.chat_template)  # a missing file fails here, not in a stage
    check_tool_parser(args)
    if not args.colocated:
        from tandem.services.launcher import serve_cluster

        default_worker_counts(args)
        return serve_cluster(args)
    from tandem.engine.args import engine_config
    from tandem.engine.inproc_client import InProcessEngineClient

    set_torch_threads(args)
    client = InProcessEngineClient(
        engine_config(args),
        args.max_num_queued_requests,
        args.max_num_queued_tokens,
        args.chat_template,
    )
    return _run_gateway(args, client)


def default_worker_counts(args: argparse.Namespace) -> None:
    """Worker counts not given: one prefill and one decode worker; for a pooling model
    (prefill only) no decode worker and a prefill worker per core."""
    import json
    import os
    from pathlib import Path

    from tandem.engine.pooling import detect_runner

    config = json.loads((Path(args.model) / "config.json").read_text())
    pooling = detect_runner(args.model, config, args.runner, args.convert) == "pooling"
    if args.decode_workers is None:
        args.decode_workers = 0 if pooling else 1
    if args.prefill_workers is None:
        args.prefill_workers = max(1, len(os.sched_getaffinity(0))) if pooling else 1


def check_tool_parser(args: argparse.Namespace) -> None:
    """Load the tool parser plugin and check the parsers' names, before serving."""
    from tandem.services.gateway import reasoning, tool_parsers

    if args.tool_parser_plugin:
        tool_parsers.load_plugin(args.tool_parser_plugin)
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise SystemExit("--enable-auto-tool-choice needs --tool-call-parser")
    try:
        if args.tool_call_parser:
            tool_parsers.get_parser(args.tool_call_parser)
        if args.reasoning_parser:
            reasoning.get_parser(args.reasoning_parser)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def _run_gateway(args: argparse.Namespace, client) -> int:
    import uvicorn

    from tandem.services.gateway.app import GatewaySettings, build_app

    names = tuple(args.served_model_name or [served_name(args.model)])
    settings = GatewaySettings(
        served_model_names=names,
        model_path=args.model,
        api_key=args.api_key,
        max_body_bytes=args.max_request_body_bytes,
        allowed_origins=tuple(args.allowed_origins),
        allowed_methods=tuple(args.allowed_methods),
        allowed_headers=tuple(args.allowed_headers),
        allow_credentials=args.allow_credentials,
        disable_fastapi_docs=args.disable_fastapi_docs,
        log_requests=args.enable_log_requests,
        max_log_len=args.max_log_len,
        structured_outputs=args.structured_outputs_config,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        runner=args.runner,
        convert=args.convert,
        enable_lora=args.enable_lora,
        lora_modules=tuple(args.lora_modules or ()) if args.enable_lora else (),
        max_lora_rank=args.max_lora_rank,
        allow_runtime_lora_updating=args.enable_lora and args.allow_runtime_lora_updating,
    )
    check_tool_parser(args)
    app = build_app(client, settings)
    scheme = "https" if args.ssl_certfile else "http"
    logger.info("serving %s as %r on %s://%s:%d", args.model, names[0], scheme, args.host,
                args.port)  # fmt: skip
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        root_path=args.root_path or "",
        log_level=args.uvicorn_log_level,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        ssl_ca_certs=args.ssl_ca_certs,
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
    from tandem.model_prep import default_model_dir
    from tandem.services.gateway.cluster_client import ClusterEngineClient

    args.model = args.model or str(default_model_dir())  # for its name only: no model loaded
    return _run_gateway(args, ClusterEngineClient(args.nats_url, args.tokenizer_url))


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from tandem.services.tokenizer.service import serve

    address = f"{args.host}:{args.port}"
    model = resolve_model(args.model)
    run_stage(serve(model, address, args.nats_url, args.health_port, args.chat_template))
    return 0


def cmd_scheduler(args: argparse.Namespace) -> int:
    from tandem.engine.config import SchedulingPolicy
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
            args.max_local_prefill_length,
        )
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from tandem.engine.args import engine_config
    from tandem.services.worker.shell import run_worker, worker_id_for

    args.model = resolve_model(args.model)
    if args.command == "prefill":
        from tandem.services.prefill.service import PrefillWorker as worker_cls
    else:
        from tandem.services.decode.service import DecodeWorker as worker_cls
    worker_id = worker_id_for(args.command, args.worker_id)
    set_torch_threads(args)
    config = engine_config(args)
    run_stage(
        run_worker(
            worker_cls,
            config,
            args.nats_url,
            worker_id,
            args.health_port,
            args.shutdown_timeout,
            (args.core_loan_dir, getattr(args, "core_loan_threads", 0)),
        )
    )
    return 0


def cmd_model_prepare(args: argparse.Namespace) -> int:
    from tandem.model_prep import PACKAGED_MODELS, packaged_model_dir, prepare_default_model

    if args.name is None:
        print(prepare_default_model(force=args.force))
        return 0
    try:
        folder = packaged_model_dir(args.name)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    if folder is None:
        raise SystemExit(f"{args.name}: not a packaged model ({', '.join(PACKAGED_MODELS)})")
    print(folder)  # complete as shipped: nothing to convert
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

    set_torch_threads(args)
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
