"""`tandem serve`: the whole cluster on one machine. Starts NATS and Redis (unless NATS_URL /
REDIS_URL name existing ones), then the tokenizer, the scheduler, the prefill and decode
workers and the gateway, each as its own process; waits until the gateway is healthy, logging
each stage as it comes up and what it still waits for; and on Ctrl-C or SIGTERM stops
everything it started.

The NATS server it starts has one account per role (gateway, tokenizer, scheduler, prefill,
decode), each allowed only its own subjects, with passwords made up for the run; each stage
gets its role's URL. A stage that dies is started again after a back-off (1 s, doubling to
30 s, back to 1 s once it stayed up a minute), however often: one stage crash-looping never
stops the others (the gateway answers 503 while no worker is live). A worker that exits 0
drained (someone sent it SIGTERM) and leaves for good."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import NoReturn

from tandem.services.placement import (  # noqa: F401 (place_workers: the launcher's API)
    make_loan_dir,
    place_on_gpus,
    place_workers,
    plan_loan,
    remove_loan_dir,
    service_cores,
    visible_gpus,
)
from tandem.services.servers import (
    LocalServer,
    free_port,
    pinned_to,
    start_nats,
    start_redis,
)
from tandem.services.startup import WAITS_FOR, StartupProgress, observe
from tandem.services.transport import kv_shm
from tandem.services.transport.bus import redact
from tandem.services.transport.subjects import Role

logger = logging.getLogger(__name__)
DEFAULT_KV_SPACE_GIB = 4.0  # shared by all workers unless --cpu-kv-cache-space is given


class Backoff:
    """How long a stage that died waits before it is started again: `first` seconds, doubling
    with each death up to `cap`; a stage that stayed up `stable` seconds starts from `first`
    again. Pure arithmetic on an injected clock."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        first: float = 1.0,
        cap: float = 30.0,
        stable: float = 60.0,
    ) -> None:
        if not 0 < first <= cap:
            raise ValueError(f"back-off: need 0 < first ({first}) <= cap ({cap})")
        self.clock = clock
        self.first, self.cap, self.stable = first, cap, stable
        self.delay = 0.0  # the last one; 0: none since it was last stable
        self.started_at = clock()

    def started(self) -> None:
        self.started_at = self.clock()

    def died(self) -> float:
        """Seconds to wait before starting the stage again."""
        if self.clock() - self.started_at >= self.stable:
            self.delay = 0.0
        self.delay = min(self.cap, 2 * self.delay) if self.delay else self.first
        return self.delay


@dataclass(slots=True)
class Stage:
    """One process of the cluster: its command line, where it runs, and when it is due to
    start again after dying."""

    name: str
    argv: list[str]
    role: Role
    cores: list[int] = field(default_factory=list)  # empty: not pinned
    nice: int = 0  # added to the process's niceness (lower CPU priority when > 0)
    env: dict[str, str] = field(default_factory=dict)  # on top of the launcher's
    incarnation: int = 0
    proc: subprocess.Popen | None = None
    backoff: Backoff = field(default_factory=Backoff)
    restart_at: float | None = None  # dead, to be started again then

    @property
    def is_worker(self) -> bool:
        return self.role in (Role.PREFILL, Role.DECODE)


PREFILL_NICE = 10


def engine_argv(args: argparse.Namespace) -> list[str]:
    """The engine flags of `tandem serve`, as a worker's command line."""
    argv = [
        "--model", args.model, "--dtype", args.dtype,
        "--max-num-seqs", str(args.max_num_seqs),
        "--block-size", str(args.block_size),
        "--scheduling-policy", args.scheduling_policy,
        "--seed", str(args.seed),
    ]  # fmt: skip
    if args.max_model_len:
        argv += ["--max-model-len", str(args.max_model_len)]
    if args.max_num_batched_tokens:
        argv += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.num_gpu_blocks_override:
        argv += ["--num-gpu-blocks-override", str(args.num_gpu_blocks_override)]
    num_workers = len(worker_roles(args))
    space = args.cpu_kv_cache_space or max(0.5, DEFAULT_KV_SPACE_GIB / num_workers)
    argv += ["--cpu-kv-cache-space", str(space)]
    if not args.enable_prefix_caching:
        argv += ["--no-enable-prefix-caching"]
    argv += ["--kv-cache-dtype", args.kv_cache_dtype]
    if args.calculate_kv_scales:
        argv.append("--calculate-kv-scales")
    argv += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    argv += ["--logprobs-mode", args.logprobs_mode]
    if args.logits_processors:
        argv += ["--logits-processors", *args.logits_processors]
    argv += ["--runner", args.runner, "--convert", args.convert]
    if args.pooler_config:
        argv += ["--pooler-config", args.pooler_config]
    if args.enforce_eager:
        argv.append("--enforce-eager")
    if args.cuda_graph_sizes:
        argv += ["--cuda-graph-sizes", *map(str, args.cuda_graph_sizes)]
    if args.speculative_config:
        argv += ["--speculative-config", args.speculative_config]
    return argv + lora_argv(args)


def lora_argv(args: argparse.Namespace) -> list[str]:
    """The LoRA flags, for the workers and the gateway alike."""
    if not args.enable_lora:
        return []
    argv = ["--enable-lora", "--max-loras", str(args.max_loras),
            "--max-lora-rank", str(args.max_lora_rank)]  # fmt: skip
    if args.max_cpu_loras is not None:
        argv += ["--max-cpu-loras", str(args.max_cpu_loras)]
    if args.lora_modules:
        argv += ["--lora-modules", *(f"{name}={path}" for name, path in args.lora_modules)]
    if args.allow_runtime_lora_updating:
        argv.append("--allow-runtime-lora-updating")
    return argv


def plan_stages(
    args: argparse.Namespace,
    nats_urls: Mapping[Role, str],
    redis_url: str,
    tokenizer_port: int,
    placements,
    light_cores,
    loan: tuple[str, list[int]] | None = None,
) -> list[Stage]:
    """The stages' command lines; each gets its role's NATS URL (`nats_urls`). With a
    `loan` (its directory, the cores lent: worker/core_loan.py) the decode worker may also run
    on the prefill workers' cores, with a thread more for each."""
    tandem = [sys.executable, "-m", "tandem.cli"]
    nats = observability_argv(args)  # the servers' URLs go by environment (credentials)
    template = ["--chat-template", args.chat_template] if args.chat_template else []
    stages = [
        Stage("tokenizer", [*tandem, "tokenizer", "--model", args.model, *template,
                            "--port", str(tokenizer_port), *nats], Role.TOKENIZER, light_cores),
        Stage("scheduler", [*tandem, "scheduler", *nats,
                            "--scheduling-policy", args.scheduling_policy,
                            "--router", args.router,
                            "--kv-overlap-weight", str(args.kv_overlap_weight),
                            "--max-local-prefill-length", str(args.max_local_prefill_length),
                            *queue_argv(args)], Role.SCHEDULER, light_cores),
    ]  # fmt: skip
    roles = worker_roles(args)
    gpus = place_on_gpus(visible_gpus(), len(roles), args.gpu_memory_utilization)
    for i, (role, (worker_cores, threads)) in enumerate(zip(roles, placements)):
        index = i if role == "prefill" else i - roles.count("prefill")
        worker_id = f"{role}-{index}"
        if args.torch_threads:
            threads = args.torch_threads
        argv = [*tandem, role, *engine_argv(args), *nats, "--worker-id", worker_id,
                "--torch-threads", str(threads)]  # fmt: skip
        if loan is not None:
            argv += ["--core-loan-dir", loan[0]]
            if role == "decode":
                argv += ["--core-loan-threads", str(threads + len(loan[1]))]
                worker_cores = sorted({*worker_cores, *loan[1]})
        # A prefill worker sharing its cores with the light stages yields to them: they carry
        # the token stream (latency), its prompts are throughput work.
        shares = role == "prefill" and bool(set(worker_cores) & set(light_cores))
        nice = PREFILL_NICE if shares else 0
        stage = Stage(worker_id, argv, Role(role), worker_cores, nice)
        if gpus:
            device, utilization = gpus[i]
            stage.env["CUDA_VISIBLE_DEVICES"] = device
            argv += ["--gpu-memory-utilization", f"{utilization:.4f}"]  # the later one counts
        stages.append(stage)
    gateway = [*tandem, "gateway", *nats, "--tokenizer-url", f"127.0.0.1:{tokenizer_port}",
               "--model", args.model, "--host", args.host, "--port", str(args.port)]  # fmt: skip
    gateway += http_argv(args) + lora_argv(args)
    # The key goes by environment: a command line is readable by every local user.
    secrets = {"TANDEM_API_KEY": args.api_key} if args.api_key else {}
    stages.append(Stage("gateway", gateway, Role.GATEWAY, light_cores, env=secrets))
    for stage in stages:  # by environment: a command line is readable by every local user
        stage.env |= {"NATS_URL": nats_urls[stage.role], "REDIS_URL": redis_url}
    return stages


def http_argv(args: argparse.Namespace) -> list[str]:
    """The HTTP flags of `tandem serve`, as the gateway's command line (the API key aside)."""
    argv = ["--max-request-body-bytes", str(args.max_request_body_bytes),
            "--uvicorn-log-level", args.uvicorn_log_level,
            "--allowed-origins", json.dumps(args.allowed_origins),
            "--allowed-methods", json.dumps(args.allowed_methods),
            "--allowed-headers", json.dumps(args.allowed_headers)]  # fmt: skip
    if args.served_model_name:
        argv += ["--served-model-name", *args.served_model_name]
    argv += ["--structured-outputs-config", args.structured_outputs_config.to_json()]
    argv += ["--runner", args.runner, "--convert", args.convert]
    for flag in ("root_path", "ssl_keyfile", "ssl_certfile", "ssl_ca_certs", "max_log_len",
                 "tool_call_parser", "tool_parser_plugin", "reasoning_parser"):  # fmt: skip
        if getattr(args, flag) is not None:
            argv += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    for switch in ("allow_credentials", "disable_fastapi_docs", "enable_log_requests",
                   "enable_auto_tool_choice", "enable_prompt_tokens_details"):  # fmt: skip
        if getattr(args, switch):
            argv.append("--" + switch.replace("_", "-"))
    return argv


def queue_argv(args: argparse.Namespace) -> list[str]:
    argv = []
    if args.max_num_queued_requests is not None:
        argv += ["--max-num-queued-requests", str(args.max_num_queued_requests)]
    if args.max_num_queued_tokens is not None:
        argv += ["--max-num-queued-tokens", str(args.max_num_queued_tokens)]
    return argv


def observability_argv(args: argparse.Namespace) -> list[str]:
    """The tracing and logging flags, passed on to every stage."""
    argv = ["--log-format", args.log_format, "--trace-sample-ratio", str(args.trace_sample_ratio)]
    if args.trace_file:
        argv += ["--trace-file", args.trace_file]
    if args.otlp_traces_endpoint:
        argv += ["--otlp-traces-endpoint", args.otlp_traces_endpoint]
    return argv


def worker_roles(args: argparse.Namespace) -> list[str]:
    """Each worker's role; counts not given (None) are one each (`tandem serve` sets them
    first from the model's kind: commands.default_worker_counts)."""
    prefill = 1 if args.prefill_workers is None else args.prefill_workers
    decode = 1 if args.decode_workers is None else args.decode_workers
    return ["prefill"] * prefill + ["decode"] * decode


def _start(stage: Stage) -> None:
    pin = pinned_to(stage.cores)

    def prepare() -> None:
        if pin is not None:
            pin()
        if stage.nice:
            os.nice(stage.nice)

    env = os.environ | stage.env if stage.env else None
    stage.proc = subprocess.Popen(stage.argv, preexec_fn=prepare, env=env)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
            return r.status == 200
    except Exception:
        return False


class Cluster:
    """The servers and stages started for one `tandem serve`."""

    def __init__(
        self, args: argparse.Namespace, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.args = args
        self.clock = clock
        self.servers: list[LocalServer] = []
        self.stages: list[Stage] = []
        self.startup: StartupProgress | None = None  # stages not seen ready yet
        self._look: Callable[[], None] = lambda: None  # one look at them (startup.observe)
        self.loan_dir: str | None = None  # the core loan's marks (core_loan.py)

    def start(self, timeout: float = 300.0) -> str:
        """Start the servers and the stages; wait until the gateway is healthy, saying on the
        way what came up and what is still awaited (startup.py). Its URL."""
        roles = worker_roles(self.args)
        cores = sorted(os.sched_getaffinity(0))
        placements = place_workers(cores, len(roles), self.args.worker_placement)
        light_cores = service_cores(roles, placements)
        nats_url = os.environ.get("NATS_URL")
        if nats_url:  # the user's server: one URL for every stage
            nats_urls = dict.fromkeys(Role, nats_url)
            logger.info("nats: using NATS_URL %s", redact(nats_url))
        else:  # the servers it starts take credentials made up for this run
            accounts = {role: secrets.token_urlsafe(24) for role in Role}
            self.servers.append(start_nats(cores=light_cores, accounts=accounts))
            nats_url = self.servers[-1].url  # without credentials: for the log
            nats_urls = {role: self.servers[-1].url_for(role) for role in Role}
            logger.info("nats-server: started on %s (pid %d)", nats_url, self.servers[-1].proc.pid)
        redis_url = os.environ.get("REDIS_URL")
        if redis_url:
            logger.info("redis: using REDIS_URL %s", redact(redis_url))
        else:
            password = secrets.token_urlsafe(24)
            self.servers.append(start_redis(cores=light_cores, password=password))
            redis_url = self.servers[-1].url
            logger.info("redis: started on %s (pid %d)", redact(redis_url),
                        self.servers[-1].proc.pid)  # fmt: skip
        tokenizer_port = free_port()
        lent = plan_loan(roles, placements, bool(visible_gpus())) if self.args.core_loan else None
        loan = None
        if lent is not None:
            self.loan_dir = make_loan_dir()
            loan = (self.loan_dir, lent)
            logger.info("core loan: the decode worker runs on cores %s too while prefill "
                        "idles", lent)  # fmt: skip
        self.stages = plan_stages(
            self.args, nats_urls, redis_url, tokenizer_port, placements, light_cores, loan
        )
        self.startup = progress = StartupProgress({s.name: WAITS_FOR[s.role] for s in self.stages})
        for stage in self.stages:
            stage.backoff = Backoff(self.clock)
            _start(stage)
            logger.info("%s: started (pid %d); %s", stage.name, stage.proc.pid,
                        progress.waiting[stage.name])  # fmt: skip
        url = f"http://{self.args.host}:{self.args.port}"
        workers = [s.name for s in self.stages if s.is_worker]
        self._look = partial(observe, progress, url, tokenizer_port, workers)
        deadline = time.monotonic() + timeout
        while not _healthy(url):
            dead = [s.name for s in self.stages if s.proc.poll() is not None]
            if dead:
                raise RuntimeError(f"stage(s) {', '.join(dead)} exited during start-up")
            if time.monotonic() > deadline:
                pending = ", ".join(f"{n} ({w})" for n, w in progress.waiting.items())
                raise RuntimeError(
                    f"the cluster was not healthy within {timeout:.0f} s; waiting for {pending}"
                )
            self._look()
            progress.remind()
            time.sleep(0.2)
        self._look()
        later = f" ({', '.join(progress.waiting)} still starting)" if progress.waiting else ""
        logger.info("ready: %s in %.1f s%s", url, progress.elapsed(), later)
        logger.info("NATS %s, Redis %s", redact(nats_url), redact(redis_url))
        for stage in self.stages:
            where = f"cores {stage.cores}" if stage.cores else "unpinned"
            logger.info("  %-10s pid %-7d %s", stage.name, stage.proc.pid, where)
        return url

    def wait(self) -> NoReturn:
        """Watch the stages until a signal stops the cluster (see the module doc); say when
        a stage still starting at `ready` (a second worker of a role) comes up."""
        while True:
            self.tend()
            if self.startup is not None and self.startup.waiting:
                self._look()
            time.sleep(0.5)

    def tend(self) -> None:
        """One look at every stage: a dead one gets its time to start again (`restart_at`,
        from its back-off), one whose time has come is started. Never sleeps, so one stage's
        back-off holds up no other."""
        now = self.clock()
        for stage in list(self.stages):
            if stage.restart_at is not None:
                if now >= stage.restart_at:
                    self._restart(stage)
                continue
            code = stage.proc.poll()
            if code is None:
                continue
            if stage.is_worker:
                _remove_kv_files(stage)
                if code == 0:
                    logger.info("worker %s drained and left", stage.name)
                    self.stages.remove(stage)
                    continue
            delay = stage.backoff.died()
            stage.restart_at = now + delay
            logger.error("%s exited with %s: starting it again in %.0f s", stage.name, code, delay)

    def _restart(self, stage: Stage) -> None:
        stage.restart_at = None
        new_id = ""
        if stage.is_worker:  # a new incarnation gets a new id: the old one's messages are stale
            i = stage.argv.index("--worker-id") + 1
            base = stage.argv[i].split(".")[0]
            stage.incarnation += 1
            stage.argv[i] = f"{base}.{stage.incarnation}"
            new_id = f" as {stage.argv[i]}"
        _start(stage)
        stage.backoff.started()
        logger.warning("%s started again%s (pid %d)", stage.name, new_id, stage.proc.pid)

    def stop(self) -> None:
        """Stop every stage at once (SIGINT: no draining, the whole cluster is going)."""
        for stage in reversed(self.stages):
            if stage.proc is not None and stage.proc.poll() is None:
                stage.proc.send_signal(signal.SIGINT)
        for stage in self.stages:
            if stage.proc is None:
                continue
            try:
                stage.proc.wait(10)
            except subprocess.TimeoutExpired:
                stage.proc.kill()
                stage.proc.wait()
            _remove_kv_files(stage)
        for server in self.servers:
            server.stop()
        remove_loan_dir(self.loan_dir)


def _remove_kv_files(stage: Stage) -> None:
    """A stage that exited leaves no KV files in shared memory (a prefill worker killed
    between writing one and its hand-off's answer would)."""
    num_files = kv_shm.remove_owned_by(stage.proc.pid)
    if num_files:
        logger.warning("removed %d KV file(s) %s left in shared memory", num_files, stage.name)


def serve_cluster(args: argparse.Namespace) -> int:
    cluster = Cluster(args)

    def on_signal(signum, frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        url = cluster.start()
        print(f"Tandem is serving {args.model} on {url}", flush=True)
        return cluster.wait()
    except KeyboardInterrupt:
        return 0
    except RuntimeError as e:  # a stage or server failed to start: say which, stop the rest
        logger.error("%s", e)
        return 1
    finally:
        cluster.stop()
