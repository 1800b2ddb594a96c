"""The flags of `tandem serve` and of each stage, by what they set (vLLM's names where vLLM
has the feature): the router, the queue bounds, the HTTP side, observability, a stage's bus
and health port."""

from __future__ import annotations

import argparse

from tandem.cli.commands import cmd_gateway, cmd_scheduler, cmd_serve, cmd_tokenizer, cmd_worker
from tandem.cli.parser import Parser, json_list, port
from tandem.cli.vllm_flags import add_absent_flags
from tandem.engine.structured_output.params import StructuredOutputsConfig

NATS_URL = "nats://127.0.0.1:4222"
LOCAL_PREFILL_DEFAULT = 256  # tokens: see docs/internals.md, "Conditional disaggregation"


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
    p.add_argument(
        "--max-local-prefill-length",
        type=int,
        default=LOCAL_PREFILL_DEFAULT,
        help="conditional disaggregation: while no prefill worker has work, a request with at "
        "most this many prompt tokens not cached on its decode worker is prefilled there, not "
        "handed off from a prefill worker (0: every request goes through a prefill worker)",
    )


def add_queue_args(p: argparse.ArgumentParser) -> None:
    """The scheduler's queue bounds: past them a new request gets 503 with Retry-After."""
    p.add_argument("--max-num-queued-requests", type=int, default=None, help="default: no bound")
    p.add_argument("--max-num-queued-tokens", type=int, default=None, help="default: no bound")


def add_http_args(p: Parser, default_port: int, env: bool) -> None:
    """The gateway's HTTP side, with vLLM's flags. `env`: host and port default to
    $TANDEM_HOST and $TANDEM_PORT (`tandem serve`)."""
    g = p.add_argument_group("HTTP server")
    if env:
        p.env_option("--host", "TANDEM_HOST", "127.0.0.1", group=g, help="address to listen on")
        p.env_option("--port", "TANDEM_PORT", default_port, port, "a port number", group=g)
    else:
        g.add_argument("--host", default="127.0.0.1")
        g.add_argument("--port", type=port, default=default_port)
    g.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="the names the model answers to (the first is the one responses give); default: "
        "the model as given (a folder's or file's name)",
    )
    p.env_option(
        "--api-key",
        "TANDEM_API_KEY",
        None,
        group=g,
        help="require `Authorization: Bearer KEY` on /v1/*, /tokenize, /detokenize and "
        "/reset_prefix_cache",
    )
    g.add_argument(
        "--max-request-body-bytes", type=int, default=8 << 20, help="larger bodies get 413"
    )
    g.add_argument("--uvicorn-log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])  # fmt: skip
    g.add_argument("--root-path", default=None, help="the path prefix a proxy serves the API under")
    g.add_argument("--allowed-origins", type=json_list, default=["*"], help="CORS, a JSON list")
    g.add_argument("--allowed-methods", type=json_list, default=["*"], help="CORS, a JSON list")
    g.add_argument("--allowed-headers", type=json_list, default=["*"], help="CORS, a JSON list")
    g.add_argument("--allow-credentials", action="store_true", help="CORS")
    g.add_argument("--ssl-keyfile", default=None)
    g.add_argument("--ssl-certfile", default=None, help="serve HTTPS")
    g.add_argument("--ssl-ca-certs", default=None)
    g.add_argument("--disable-fastapi-docs", action="store_true",
                   help="no /docs, /redoc or /openapi.json")  # fmt: skip
    g.add_argument(
        "--enable-log-requests", action="store_true", help="log each request's prompt and params"
    )
    g.add_argument(
        "--disable-log-requests",
        dest="enable_log_requests",
        action="store_false",
        help="the default (vLLM's older flag)",
    )
    g.add_argument(
        "--max-log-len",
        type=int,
        default=None,
        help="characters and token ids of a prompt that a request's log line shows",
    )
    g.add_argument(
        "--structured-outputs-config",
        type=structured_outputs_config,
        default="auto",  # a string default goes through `type` too
        help='structured outputs, vLLM\'s JSON: {"backend": "auto" | "xgrammar" | "guidance", '
        '"disable_any_whitespace": true, "disable_fallback": false, "enable_in_reasoning": '
        "false} (the defaults; auto is xgrammar, and guidance for what xgrammar does not "
        "enforce; with a reasoning parser a constraint starts where the reasoning ends unless "
        "enable_in_reasoning)",
    )

    g.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='tool_choice "auto": the model\'s own calls, found by --tool-call-parser',
    )
    g.add_argument(
        "--tool-call-parser",
        default=None,
        help="how the model writes tool calls: hermes, llama3_json, mistral, pythonic (or "
        "one a --tool-parser-plugin registers)",
    )
    g.add_argument(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="usage.prompt_tokens_details.cached_tokens: the prompt tokens served from the "
        "prefix cache",
    )
    g.add_argument(
        "--reasoning-parser",
        default=None,
        help="deepseek_r1 or qwen3: the text in <think>...</think> goes to the message's "
        "`reasoning` (and `reasoning_content`)",
    )
    g.add_argument(
        "--tool-parser-plugin",
        default=None,
        help="a Python file that registers tool parsers (tandem.services.gateway."
        "tool_parsers.register)",
    )


def structured_outputs_config(text: str) -> StructuredOutputsConfig:
    try:
        return StructuredOutputsConfig.parse(text)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_chat_template_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--chat-template",
        default=None,
        help="a Jinja chat template, or a file holding one, instead of the model's",
    )


def add_observability_args(p: Parser) -> None:
    g = p.add_argument_group("observability")
    p.env_option(
        "--otlp-traces-endpoint",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        None,
        group=g,
        help="export every request's trace over OTLP/HTTP (e.g. http://localhost:4318/v1/traces)",
    )
    p.env_option(
        "--trace-file",
        "TANDEM_TRACE_FILE",
        None,
        group=g,
        help="append every stage's spans to this file, one OTLP JSON line per span",
    )
    g.add_argument(
        "--trace-sample-ratio",
        type=float,
        default=1.0,
        help="fraction of requests traced (the gateway decides for every stage)",
    )
    g.add_argument("--log-format", default="text", choices=["text", "json"])


def add_stage_args(p: Parser, drains: bool = False, health: bool = True) -> None:
    """What an orchestrator needs of a stage: NATS, and /health for one with no HTTP port."""
    p.env_option("--nats-url", "NATS_URL", NATS_URL, help="the bus")
    if health:
        p.env_option(
            "--health-port",
            "TANDEM_HEALTH_PORT",
            None,
            port,
            "a port number",
            help="serve /health, /ready and /metrics on this port, all interfaces",
        )
    if drains:
        p.add_argument(
            "--shutdown-timeout",
            type=float,
            default=30.0,
            help="seconds a SIGTERM'd worker takes to finish its requests before handing the "
            "rest back to the scheduler",
        )


def _model_positional(ns: argparse.Namespace, p: Parser) -> None:
    """`tandem serve MODEL` (vLLM's form) or `--model MODEL` (its older one)."""
    tag = ns.__dict__.pop("model_tag", None)
    if tag and ns.model and tag != ns.model:
        p.error(f"the model is given twice: {tag!r} and --model {ns.model!r}")
    ns.model = tag or ns.model


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    from tandem.engine.args import add_engine_args

    serve = sub.add_parser(
        "serve",
        help="serve a model behind the OpenAI-compatible API (the whole cluster)",
        description="Serve MODEL behind the OpenAI-compatible API: NATS, Redis and every "
        "stage, or one process with --colocated. vLLM's flags mean what they mean in vLLM.",
    )
    serve.add_argument(
        "model_tag",
        metavar="model",
        nargs="?",
        default=None,
        help="a Hugging Face folder, a .gguf file (converted once) or a Hugging Face id in the "
        "local HF cache (never downloaded); default: the prepared SmolLM2-135M-Instruct",
    )
    serve.add_argument("--config", default=None, help="a YAML file of flags (command line wins)")
    serve.after.append(_model_positional)
    add_engine_args(serve)
    add_chat_template_arg(serve)
    add_http_args(serve, 8000, env=True)
    serve.add_argument(
        "--colocated",
        action="store_true",
        help="one process: the gateway with the engine in it (no NATS, no Redis)",
    )
    add_router_args(serve)
    add_queue_args(serve)
    add_observability_args(serve)
    serve.add_argument(
        "--prefill-workers", type=int, default=None,
        help="default 1; a pooling model's cluster: one per core (its work is all prefill)",
    )  # fmt: skip
    serve.add_argument(
        "--decode-workers", type=int, default=None,
        help="default 1; a pooling model's cluster: none (it needs none)",
    )  # fmt: skip
    serve.add_argument(
        "--worker-placement",
        default="auto",
        choices=["auto", "pinned", "shared"],
        help="pinned: each worker on its own cores; shared: every worker on every core; "
        "auto: pinned when there are as many cores as workers",
    )
    serve.add_argument(
        "--core-loan",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pinned workers: the decode worker borrows the prefill workers' cores while "
        "they have no work (docs/internals.md)",
    )
    add_absent_flags(serve)
    serve.set_defaults(func=cmd_serve)


def add_stage_parsers(sub: argparse._SubParsersAction) -> None:
    from tandem.engine.args import add_engine_args, add_lora_args, add_runner_args

    gateway = sub.add_parser("gateway", help="the REST gateway of a cluster")
    gateway.add_argument("--model", default=None, help="the model folder (its name is served)")
    add_http_args(gateway, 8000, env=False)
    add_lora_args(gateway)
    gateway.add_argument("--tokenizer-url", default="127.0.0.1:50051", help="host:port (gRPC)")
    add_runner_args(gateway)
    gateway.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds a SIGTERM'd gateway waits for open requests",
    )
    add_stage_args(gateway, health=False)
    add_observability_args(gateway)
    gateway.set_defaults(func=cmd_gateway)

    tok = sub.add_parser("tokenizer", help="the tokenizer stage (gRPC, and the text stream)")
    tok.add_argument("--model", default=None)
    add_chat_template_arg(tok)
    tok.add_argument("--host", default="127.0.0.1")
    tok.add_argument("--port", type=port, default=50051)
    add_stage_args(tok)
    add_observability_args(tok)
    tok.set_defaults(func=cmd_tokenizer)

    sched = sub.add_parser("scheduler", help="the central scheduler")
    sched.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"])
    sched.add_argument("--worker-timeout", type=float, default=5.0, help="seconds")
    sched.add_argument(
        "--no-worker-timeout",
        type=float,
        default=30.0,
        help="seconds without a prefill or decode worker before queued requests get 503",
    )
    sched.env_option("--redis-url", "REDIS_URL", None, help="the prefix-cache index")
    add_router_args(sched)
    add_queue_args(sched)
    add_stage_args(sched)
    add_observability_args(sched)
    sched.set_defaults(func=cmd_scheduler)

    for role in ("prefill", "decode"):
        worker = sub.add_parser(role, help=f"a {role} worker")
        add_engine_args(worker)
        worker.add_argument("--worker-id", default=None)
        worker.add_argument(
            "--core-loan-dir",
            default=None,
            help="where the workers on this machine mark a prefill worker busy (set by "
            "`tandem serve`): a decode worker borrows the prefill workers' cores while none is",
        )
        if role == "decode":
            worker.add_argument(
                "--core-loan-threads",
                type=int,
                default=0,
                help="torch threads of a step run on borrowed cores (with --core-loan-dir)",
            )
        add_stage_args(worker, drains=True)
        add_observability_args(worker)
        worker.set_defaults(func=cmd_worker)
