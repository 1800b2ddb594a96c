"""`tandem bench serve --workload elastic`: decode replicas joining and leaving under load.

The cluster starts with two decode workers and the throughput load runs. After
`--join-after` seconds a third decode worker starts: the same command line as the others
with a new id (nothing else is told: it joins by its heartbeats over NATS). Once it has run
requests, the first decode worker gets SIGTERM and drains: it takes no new requests and
finishes what it has (or hands it back) within its --shutdown-timeout. Every request must
complete with its full output, and the new worker must have taken load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tandem.bench.deploy import children, flag_value, proc_argv, server_root
from tandem.bench.load import ServerInfo, random_prompts, run_load, summarize

DEPLOYMENTS = {"disaggregated": ["--decode-workers", "2"]}


@dataclass(slots=True)
class Proc:
    pid: int
    argv: list[str]


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def cluster_workers(url: str) -> dict[str, Proc]:
    """The workers of the local `tandem serve` answering on `url`, by worker id (its
    launcher's children that have one)."""
    root = server_root(url)
    if root is None:
        raise RuntimeError(f"no local server process serves {url}")
    workers = {}
    for pid in children(root):
        with contextlib.suppress(OSError):
            argv = proc_argv(pid)
            if worker_id := flag_value(argv, "--worker-id"):
                workers[worker_id] = Proc(pid, argv)
    return workers


def _gone(pid: int) -> bool:
    """True once the process has exited (a zombie counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def _decode_stats(http: httpx.AsyncClient) -> dict[str, dict]:
    workers = (await http.get("/stats")).raise_for_status().json()["workers"]
    return {k: w for k, w in workers.items() if w["role"] == "decode"}


async def _until(predicate, timeout: float, what: str) -> float:
    """Poll an async predicate every 0.2 s; the seconds it took."""
    start = time.perf_counter()
    while not await predicate():
        if time.perf_counter() - start > timeout:
            raise RuntimeError(f"{what} did not happen within {timeout:.0f} s")
        await asyncio.sleep(0.2)
    return time.perf_counter() - start


async def _scenario(url: str, prompts, args: argparse.Namespace) -> dict:
    workers = cluster_workers(url)
    decodes = sorted(k for k in workers if k.startswith("decode"))
    leaving, template = decodes[0], workers[decodes[0]].argv
    new_id = f"decode-{len(decodes)}"
    argv = [*template]
    argv[argv.index("--worker-id") + 1] = new_id
    load = asyncio.create_task(
        run_load(
            url,
            prompts,
            args.output_len,
            args.max_concurrency,
            args.request_rate,
            args.seed,
            desc="elastic",
        )  # fmt: skip
    )
    start = time.perf_counter()
    events: dict[str, float] = {}
    joiner = None
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        try:
            await asyncio.sleep(args.join_after)
            # its environment too: the servers' URLs (with credentials) travel there
            env = _environ(workers[leaving].pid)
            joiner = subprocess.Popen(argv, start_new_session=True, env=env)
            events["started_s"] = time.perf_counter() - start

            async def joined() -> bool:
                return new_id in await _decode_stats(http)

            async def took_load() -> bool:
                return (await _decode_stats(http))[new_id]["num_steps"] > 0

            await _until(joined, 300, f"{new_id} joining")
            events["joined_s"] = time.perf_counter() - start
            await _until(took_load, 300, f"{new_id} taking requests")
            os.kill(workers[leaving].pid, signal.SIGTERM)
            events["sigterm_s"] = time.perf_counter() - start

            async def left() -> bool:
                return _gone(workers[leaving].pid)

            events["drain_s"] = await _until(left, 600, f"{leaving} draining")
            results, duration = await load
            stats = await _decode_stats(http)
        finally:
            if not load.done():
                load.cancel()
            if joiner is not None:
                joiner.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    joiner.wait(15)
                if joiner.poll() is None:
                    joiner.kill()
    figures = summarize(results, duration)
    return figures | {
        "events": events,
        "leaving_worker": leaving,
        "new_worker": new_id,
        "new_worker_steps": stats.get(new_id, {}).get("num_steps", 0),
        "new_worker_kv_blocks_received": stats.get(new_id, {}).get("num_kv_blocks_received", 0),
        "launcher_alive": not _gone(server_root(url) or 0),
    }


def run(name: str, url: str, info: ServerInfo, args: argparse.Namespace) -> dict:
    prompts = random_prompts(args.num_prompts + 2, args.input_len, info.vocab_size, args.seed)
    f = asyncio.run(_scenario(url, prompts, args))
    e = f["events"]
    print(f"{'=' * 20} elastic decode ({name}) {'=' * 20}")
    print(f"{f['new_worker']} started at {e['started_s']:.1f} s, joined at {e['joined_s']:.1f} s; "
          f"{f['leaving_worker']} SIGTERM at {e['sigterm_s']:.1f} s, "
          f"drained and gone {e['drain_s']:.1f} s later")  # fmt: skip
    print(f"completed / failed: {f['completed']} / {f['failed']}  "
          f"({f['output_tok_s']:.1f} output tok/s over {f['duration_s']:.1f} s)")  # fmt: skip
    for error in f["errors"]:
        print(f"  error: {error}")
    print(f"{f['new_worker']}: {f['new_worker_steps']} decode steps, "
          f"{f['new_worker_kv_blocks_received']} KV blocks received")  # fmt: skip
    return f


def report(runs: dict[str, dict], args: argparse.Namespace) -> tuple[dict, bool]:
    ((name, f),) = runs.items()
    ok = f["failed"] == 0 and f["new_worker_steps"] > 0 and f["launcher_alive"]
    print(
        f"no request failed: {f['failed'] == 0}; the new worker took load: "
        f"{f['new_worker_steps'] > 0}; the cluster kept running: {f['launcher_alive']}"
    )
    keys = ("num_prompts", "input_len", "output_len", "max_concurrency", "join_after")
    workload = {k: getattr(args, k) for k in keys}
    return {"workload": workload, "deployments": runs}, ok
