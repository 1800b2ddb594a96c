"""`tandem bench serve`: online serving load, like `vllm bench serve`.

Unless `--url` names a server, it starts `tandem serve` disaggregated, then `--colocated`, shows
where each one's processes sit on the cores, and drives the same load at both: distinct
random-token prompts, streaming /v1/completions, EOS ignored (exactly `--output-len` tokens
each). It reports TTFT, TPOT, ITL, E2E, throughput and the ratio of output tok/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import httpx
import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_VOCAB_SIZE = 49152  # SmolLM2's, the default model
SSE_DONE = "[DONE]"
DEPLOYMENT_FLAGS = {"disaggregated": [], "colocated": ["--colocated"]}
_TIMEOUT = httpx.Timeout(600.0, connect=30.0, pool=None)


# -- pure helpers ----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linearly interpolated; 0.0 for no values."""
    return float(np.percentile(values, q)) if values else 0.0


def stats_ms(values_s: list[float]) -> dict[str, float]:
    """Mean, p50, p90 and p99 of durations given in seconds, in milliseconds."""
    ms = [v * 1000.0 for v in values_s]
    mean = sum(ms) / len(ms) if ms else 0.0
    return {"mean": mean, **{f"p{q}": percentile(ms, q) for q in (50, 90, 99)}}


def poisson_gaps(n: int, rate: float, seed: int) -> list[float]:
    """n exponential inter-arrival gaps for a Poisson process of `rate` per second (inf: 0)."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    return [rng.expovariate(rate) for _ in range(n)]


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """When each request arrives, in seconds from the start; the first at 0."""
    return list(accumulate(poisson_gaps(n - 1, rate, seed), initial=0.0))[:n]


def random_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """n distinct prompts of random token ids in [10, vocab_size - 10) (no shared prefixes
    in practice, so no prefix-cache hits between requests)."""
    if vocab_size <= 20:
        raise ValueError(f"vocab_size must be > 20, got {vocab_size}")
    rng = random.Random(seed)
    prompts: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    while len(prompts) < n:
        ids = [rng.randrange(10, vocab_size - 10) for _ in range(length)]
        if tuple(ids) not in seen:
            seen.add(tuple(ids))
            prompts.append(ids)
    return prompts


def parse_sse_line(line: str) -> dict | str | None:
    """One line of an SSE stream: its JSON payload, SSE_DONE, or None (not a data line)."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :].strip()
    if data == SSE_DONE:
        return SSE_DONE
    return json.loads(data) if data else None


@dataclass(slots=True)
class RequestResult:
    """One request's timings in seconds (ok) or why it failed."""

    ok: bool
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    output_tokens: int | None = None
    error: str | None = None


def result_from_events(
    start: float, events: list[tuple[float, dict]], end: float, done: bool, expected: int
) -> RequestResult:
    """Timings from a stream's (arrival time, event) pairs. Every event with choices is a
    content chunk (the gateway sends one per engine step); usage gives the token count."""
    for _, event in events:
        if "error" in event:
            return RequestResult(False, error=f"stream error: {event['error'].get('message')}")
    content_times = [t for t, event in events if event.get("choices")]
    usages = [event["usage"] for _, event in events if event.get("usage")]
    tokens = usages[-1].get("completion_tokens") if usages else None
    error = None
    if not done:
        error = "stream ended before [DONE]"
    elif not content_times:
        error = "no content chunks"
    elif tokens != expected:
        error = f"{tokens} output tokens, expected {expected}"
    if error is not None:
        return RequestResult(False, output_tokens=tokens, error=error)
    itl = [b - a for a, b in zip(content_times, content_times[1:])]
    return RequestResult(True, content_times[0] - start, itl, end - start, tokens)


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    """The run's figures: counts, throughput, latency stats in ms, per-request token counts."""
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens or 0 for r in done)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if (r.output_tokens or 0) > 1]
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration_s,
        "request_throughput": len(done) / duration_s if duration_s > 0 else 0.0,
        "output_tok_s": output_tokens / duration_s if duration_s > 0 else 0.0,
        "total_output_tokens": output_tokens,
        "ttft_ms": stats_ms([r.ttft for r in done]),
        "tpot_ms": stats_ms(tpot),
        "itl_ms": stats_ms([gap for r in done for gap in r.itl]),
        "e2e_ms": stats_ms([r.e2e for r in done]),
        "output_lens": [r.output_tokens for r in results],
        "errors": sorted({r.error for r in results if r.error})[:10],
    }


def format_cpus(cpus: set[int]) -> str:
    """A core set as ranges: {0, 1, 2, 5} -> "0-2,5"."""
    parts, ordered = [], sorted(cpus)
    for i, cpu in enumerate(ordered):
        if i == 0 or cpu != ordered[i - 1] + 1:
            parts.append([cpu, cpu])
        else:
            parts[-1][1] = cpu
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def short_name(argv: list[str], comm: str = "") -> str:
    """A process's role from its command line: the `tandem` subcommand, the service module,
    or the binary's name (nats-server, redis-server)."""
    if not argv:
        return comm or "?"
    if "tandem.cli" in argv or Path(argv[0]).name == "tandem":
        i = argv.index("tandem.cli") if "tandem.cli" in argv else 0
        words = []
        for arg in argv[i + 1 :]:
            if arg.startswith("-") or len(words) == 2:
                break
            words.append(arg)
        return " ".join(words) or "tandem"
    name = Path(argv[0].split()[0]).name
    if not name.startswith("python"):
        return name
    if "-m" in argv[:-1]:
        module = argv[argv.index("-m") + 1].removeprefix("tandem.services.")
        return module.removeprefix("tandem.").split(".")[0]
    return comm or name


# -- deployments -----------------------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """root and its descendants (every thread's children), depth first."""
    pids, stack = [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        kids: list[int] = []
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    kids += [int(k) for k in (task / "children").read_text().split()]
        stack.extend(sorted(kids, reverse=True))
    return pids


def placement(root: int) -> list[dict]:
    """Each process of the tree: pid, role, the cores it may run on, its thread count."""
    rows = []
    for pid in process_tree(root):
        try:
            proc = Path(f"/proc/{pid}")
            argv = [a for a in proc.joinpath("cmdline").read_bytes().decode().split("\0") if a]
            comm = proc.joinpath("comm").read_text().strip()
            status = proc.joinpath("status").read_text().splitlines()
            threads = next(int(s.split()[1]) for s in status if s.startswith("Threads:"))
            cpus = format_cpus(os.sched_getaffinity(pid))
        except (OSError, StopIteration):
            continue  # gone meanwhile
        rows.append({"pid": pid, "name": short_name(argv, comm), "cpus": cpus, "threads": threads})
    return rows


def _log_tail(path: Path, num_chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-num_chars:]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{_log_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"server not healthy within {timeout:.0f} s:\n{_log_tail(log)}")


def _stop(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM to the server's process group, SIGKILL to whatever is left after `timeout`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def deployment(serve_args: list[str], timeout: float) -> Iterator[tuple[str, int]]:
    """`tandem serve` on a free port in its own session, its log in a temp dir: (url, pid)."""
    from tandem.services.common.servers import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "tandem.cli", "serve", "--port", str(port), *serve_args]
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as scratch:
        log = Path(scratch) / "server.log"
        logger.info("starting %s (log %s)", shlex.join(cmd), log)
        with open(log, "wb") as out:
            # Its own session: stopping it signals its whole process group.
            env = os.environ | {"PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, proc, log, timeout)
            yield url, proc.pid
        finally:
            _stop(proc)


# -- load ------------------------------------------------------------------------------------


async def send_request(
    client: httpx.AsyncClient, prompt: list[int], output_len: int
) -> RequestResult:
    """One streaming completion, timed from send to [DONE]."""
    body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    events: list[tuple[float, dict]] = []
    done = False
    start = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                return RequestResult(False, error=f"HTTP {resp.status_code}: {text[:200]}")
            async for line in resp.aiter_lines():
                now, event = time.perf_counter(), parse_sse_line(line)
                if event == SSE_DONE:
                    done = True
                    break
                if isinstance(event, dict):
                    events.append((now, event))
    except (httpx.HTTPError, ValueError) as e:
        return RequestResult(False, error=f"{type(e).__name__}: {e}")
    return result_from_events(start, events, time.perf_counter(), done, output_len)


async def run_load(
    url: str,
    prompts: list[list[int]],
    output_len: int,
    max_concurrency: int,
    rate: float,
    seed: int,
) -> tuple[list[RequestResult], float]:
    """Two warm-up requests (prompts[:2]), then the rest at Poisson arrivals, at most
    max_concurrency in flight (<= 0: no cap). Returns the results and the duration."""
    limit = max_concurrency if max_concurrency > 0 else len(prompts)
    sem = asyncio.Semaphore(limit)
    limits = httpx.Limits(max_connections=limit + 2, max_keepalive_connections=limit + 2)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=_TIMEOUT) as client:
        warm = await asyncio.gather(*(send_request(client, p, 4) for p in prompts[:2]))
        if not all(r.ok for r in warm):
            raise RuntimeError(f"warm-up failed: {[r.error for r in warm if not r.ok]}")
        timed = prompts[2:]
        offsets = arrival_offsets(len(timed), rate, seed)
        start = time.perf_counter()

        async def one(prompt: list[int], offset: float) -> RequestResult:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            async with sem:
                return await send_request(client, prompt, output_len)

        results = await asyncio.gather(*(one(p, o) for p, o in zip(timed, offsets)))
        return list(results), time.perf_counter() - start


# -- report ----------------------------------------------------------------------------------


def _vocab_size_of(model_path: str | None) -> int | None:
    config = Path(model_path or "") / "config.json"
    if not model_path or not config.is_file():
        return None
    data = json.loads(config.read_text())
    return data.get("vocab_size") or data.get("text_config", {}).get("vocab_size")


def print_placement(name: str, rows: list[dict]) -> None:
    print(f"placement of {name} ({os.cpu_count()} cores; bench client on "
          f"{format_cpus(os.sched_getaffinity(0))}):")  # fmt: skip
    print(f"  {'pid':>8}  {'name':<16} {'cores':<16} threads")
    for r in rows:
        print(f"  {r['pid']:>8}  {r['name']:<16} {r['cpus']:<16} {r['threads']}")


def print_figures(name: str, f: dict) -> None:
    print(f"{'=' * 20} {name} {'=' * 20}")
    print(f"completed / failed:          {f['completed']} / {f['failed']}")
    for error in f["errors"]:
        print(f"  error: {error}")
    print(f"duration (s):                {f['duration_s']:.2f}")
    print(f"request throughput (req/s):  {f['request_throughput']:.2f}")
    print(f"output throughput (tok/s):   {f['output_tok_s']:.1f}")
    print(f"{'(ms)':<6} {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}")
    for key in ("ttft", "tpot", "itl", "e2e"):
        row = " ".join(f"{v:>9.2f}" for v in f[f"{key}_ms"].values())
        print(f"{key.upper():<6} {row}")


def bench_one(name: str, url: str, pid: int | None, args: argparse.Namespace) -> dict:
    """Drive one server with the configured load; its figures (and placement, given a pid)."""
    card = httpx.get(f"{url}/v1/models", timeout=30.0).raise_for_status().json()["data"][0]
    max_model_len = card.get("max_model_len") or 0
    if max_model_len and args.input_len + args.output_len > max_model_len:
        raise ValueError(f"input_len + output_len must be <= max_model_len ({max_model_len})")
    vocab_size = (
        args.vocab_size
        or _vocab_size_of(args.model)
        or _vocab_size_of(card.get("root"))
        or DEFAULT_VOCAB_SIZE
    )
    rows = placement(pid) if pid is not None else []
    if rows:
        print_placement(name, rows)
    prompts = random_prompts(args.num_prompts + 2, args.input_len, vocab_size, args.seed)
    load = run_load(url, prompts, args.output_len, args.max_concurrency, args.request_rate,
                    args.seed)  # fmt: skip
    results, duration = asyncio.run(load)
    figures = summarize(results, duration) | {"url": url, "placement": rows}
    print_figures(name, figures)
    return figures


def cmd_bench_serve(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 when every request succeeded, 1 otherwise."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs every request at INFO
    server_args = shlex.split(args.server_args or "")
    if args.model:
        server_args = ["--model", args.model, *server_args]
    runs: dict[str, dict] = {}
    if args.url:
        runs["server"] = bench_one("server", args.url.rstrip("/"), None, args)
    else:
        names = [n.strip() for n in args.deployments.split(",") if n.strip()]
        if not names or set(names) - DEPLOYMENT_FLAGS.keys():
            raise ValueError(f"deployments must be among {sorted(DEPLOYMENT_FLAGS)}: {names}")
        for name in names:
            flags = [*server_args, *DEPLOYMENT_FLAGS[name]]
            with deployment(flags, args.startup_timeout) as (url, pid):
                runs[name] = bench_one(name, url, pid, args)
    main = runs.get("disaggregated") or next(iter(runs.values()))
    colocated = runs.get("colocated", {}).get("output_tok_s")
    ratio = None
    if "disaggregated" in runs and colocated:
        ratio = main["output_tok_s"] / colocated
        print(f"ratio disaggregated / colocated output tok/s: {ratio:.2f}x")
    report = {
        "output_tok_s": main["output_tok_s"],
        "colocated_tok_s": colocated,
        "ratio": ratio,
        **{f"{m}_{q}_ms": main[f"{m}_ms"][q] for m in ("ttft", "itl") for q in ("p50", "p99")},
        "deployments": runs,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r["failed"] == 0 for r in runs.values()) else 1


def add_bench_serve_parser(bench_sub: argparse._SubParsersAction) -> None:
    """Add `serve` to the `tandem bench` subcommands."""
    p = bench_sub.add_parser("serve", help="online serving load: disaggregated vs colocated")
    p.add_argument("--url", default=None, help="drive this running server only (no comparison)")
    p.add_argument("--model", default=None, help="model folder (default: the server's default)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, default=32, help="in-flight cap (<= 0: none)")
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson req/s")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=None, help="default: the model's config")
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.add_argument(
        "--server-args", default="", help='flags for both servers, e.g. "--dtype float32"'
    )
    p.add_argument("--deployments", default="disaggregated,colocated", help=argparse.SUPPRESS)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.set_defaults(func=cmd_bench_serve)
