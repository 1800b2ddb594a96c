"""`tandem bench serve --workload soak`: steady mixed load with clients that walk away.

For `--duration-s`, `--max-concurrency` clients each send one streaming request after
another: prompts and outputs of random lengths (`--input-len` and `--output-len` are the
upper bounds), and with probability `--disconnect-prob` the client drops the connection at a
random point of the stream. Afterwards it waits for the server to go idle and reports
completed, failed (errors other than its own disconnects), disconnected, blocks not back
in their pool (must be 0), and each server process's resident memory over time: sampled
every `--rss-interval-s`, compared at the end (once idle) with its value at the settle mark
(`--settle-s`: 300 s, or a fifth of a shorter run). A process may grow by up to
`--max-rss-growth-pct` after the mark; the first part is its warm-up (caches, the
allocator's pools reaching the load's peak), after which its memory must stay flat.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time
from pathlib import Path

from tandem.bench.deploy import process_tree, server_root, short_name
from tandem.bench.load import (
    ServerInfo,
    client,
    content_times,
    random_token_ids,
    send_request,
    wait_idle,
)
from tandem.bench.progress import tick_seconds

DEPLOYMENTS = {"disaggregated": [], "colocated": ["--colocated"]}
SETTLE_S = 300.0  # the bound: no process grows more than 5% after its first 5 minutes


def add_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--disconnect-prob", type=float, default=0.2,
                   help="soak: share of requests whose client leaves mid-stream")  # fmt: skip
    g.add_argument("--settle-s", type=float, default=None,
                   help="soak: memory growth counts from here (default: 300 s, or a fifth "
                        "of a shorter run)")  # fmt: skip
    g.add_argument("--rss-interval-s", type=float, default=15.0,
                   help="soak: seconds between samples of each process's memory")  # fmt: skip
    g.add_argument("--max-rss-growth-pct", type=float, default=5.0,
                   help="soak: most a process may grow after the settle mark")  # fmt: skip


def server_processes(url: str) -> list[int]:
    """The pids of the local server answering on `url`: the launcher and all it started
    (disaggregated), or the one process (colocated)."""
    root = server_root(url)
    return process_tree(root) if root is not None else []


def rss_mib(pids: list[int]) -> dict[str, float]:
    """Resident memory of each process, by "name (pid)"."""
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError, StopIteration):
            proc = Path(f"/proc/{pid}")
            status = proc.joinpath("status").read_text().splitlines()
            kib = next(int(s.split()[1]) for s in status if s.startswith("VmRSS:"))
            argv = [a for a in proc.joinpath("cmdline").read_bytes().decode().split("\0") if a]
            out[f"{short_name(argv)} ({pid})"] = kib / 1024
    return out


# -- the memory report (pure) ----------------------------------------------------------------


def settle_mark_s(duration_s: float, settle_s: float | None = None) -> float:
    """Seconds into the load from which memory growth counts: `settle_s` when given, else
    SETTLE_S, or a fifth of a run shorter than five times that."""
    if settle_s is not None:
        return settle_s
    return min(SETTLE_S, duration_s / 5)


def sample_at(samples: list[tuple[float, dict[str, float]]], t: float) -> tuple[float, dict]:
    """The first (time, RSS by process) sample taken at or after `t` seconds, else the last."""
    return next((s for s in samples if s[0] >= t), samples[-1])


def growth_pct(before: float, after: float) -> float:
    """after relative to before, in percent (0 when before is 0)."""
    return 100.0 * (after - before) / before if before > 0 else 0.0


MIN_GROWTH_MIB = 8.0  # growth below this is within the bound whatever its percentage


def memory_report(
    samples: list[tuple[float, dict[str, float]]], mark_s: float, max_growth_pct: float
) -> dict:
    """RSS of each process at the start (the first sample), at the settle mark and at the end
    (the last sample), its growth in % after the mark, and the worst process. A process
    missing from the mark or the end sample (restarted, or gone) is left out. A growth under
    MIN_GROWTH_MIB passes the bound (a 7 MiB Redis that holds a few more index keys is not a
    leak); the worst is the largest percentage among the others."""
    (_, start), (mark_t, mark), (_, end) = samples[0], sample_at(samples, mark_s), samples[-1]
    names = [k for k in mark if k in end]
    growth = {k: growth_pct(mark[k], end[k]) for k in names}
    counted = [k for k in names if end[k] - mark[k] >= MIN_GROWTH_MIB] or names
    worst = max(counted, key=growth.__getitem__, default=None)
    return {
        "rss_mark_s": mark_t,
        "rss_mib_mark": {k: mark[k] for k in names},
        "rss_growth_pct_after_mark": growth,
        "rss_growth_pct_start_to_end": {
            k: growth_pct(start[k], end[k]) for k in names if k in start
        },
        "rss_worst": None if worst is None else {"process": worst, "growth_pct": growth[worst]},
        "max_rss_growth_pct": max_growth_pct,
        "rss_within_bound": all(
            g <= max_growth_pct or end[k] - mark[k] < MIN_GROWTH_MIB for k, g in growth.items()
        ),
    }


# -- the load --------------------------------------------------------------------------------


async def _client(http, rng: random.Random, info: ServerInfo, args, until: float, counts):
    while time.perf_counter() < until:
        prompt = random_token_ids(rng, rng.randint(1, args.input_len), info.vocab_size)
        output_len = rng.randint(1, args.output_len)
        events: list[tuple[float, dict]] = []
        if rng.random() < args.disconnect_prob:  # leaves after a random share of the stream
            task = asyncio.create_task(send_request(http, prompt, output_len, events))
            await asyncio.sleep(rng.uniform(0.0, 0.05 * output_len))
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                counts["disconnected"] += 1
                counts["output_tokens"] += len(content_times(events))
                continue
            result = task.result()
        else:
            result = await send_request(http, prompt, output_len, events)
        counts["output_tokens"] += len(content_times(events))
        counts["completed" if result.ok else "failed"] += 1
        if not result.ok and len(counts["errors"]) < 10:
            counts["errors"].append(result.error)


async def _sample_rss(pids: list[int], t0: float, interval_s: float, samples: list) -> None:
    """Append (seconds since t0, RSS by process) every interval_s until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        samples.append((time.perf_counter() - t0, rss_mib(pids)))


async def _soak(url: str, info: ServerInfo, args, name: str) -> dict:
    counts = {"completed": 0, "failed": 0, "disconnected": 0, "output_tokens": 0, "errors": []}
    pids = server_processes(url)
    async with client(url, args.max_concurrency + 2) as http:
        await send_request(http, [1, 2, 3], 4)  # first-call costs out of the baseline
        t0 = time.perf_counter()
        samples = [(0.0, rss_mib(pids))]
        sampler = asyncio.create_task(_sample_rss(pids, t0, args.rss_interval_s, samples))
        until = t0 + args.duration_s
        rngs = [random.Random(f"{args.seed}-{i}") for i in range(args.max_concurrency)]

        def status() -> str:
            return (f"completed {counts['completed']}, failed {counts['failed']}, "
                    f"disconnected {counts['disconnected']}")  # fmt: skip

        bar = asyncio.create_task(tick_seconds(args.duration_s, f"soak {name}", status))
        await asyncio.gather(*(_client(http, r, info, args, until, counts) for r in rngs))
        bar.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await bar
        load_s = time.perf_counter() - t0
        idle = await wait_idle(http, 120)
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        workers = (await http.get("/stats")).json()["workers"]
    samples.append((time.perf_counter() - t0, rss_mib(pids)))
    before, after = samples[0][1], samples[-1][1]
    leaked = sum(w["num_blocks"] - w["num_free_blocks"] for w in workers.values())
    mark_s = settle_mark_s(args.duration_s, args.settle_s)
    return counts | {
        "idle_after": idle,
        "leaked_blocks": leaked,
        "output_tok_s": counts["output_tokens"] / load_s,
        "rss_mib_start": before,
        "rss_mib_end": after,
        "rss_growth_mib": {k: after[k] - v for k, v in before.items() if k in after},
        **memory_report(samples, mark_s, args.max_rss_growth_pct),
        "rss_samples": [{"t_s": round(t, 1), "rss_mib": rss} for t, rss in samples],
    }


def print_memory(f: dict) -> None:
    print(f"  {'process':<28} {'start':>9} {'at ' + format(f['rss_mark_s'], '.0f') + ' s':>10} "
          f"{'end':>9} {'growth':>9} {'after mark':>11}  (MiB)")  # fmt: skip
    for key, pct in f["rss_growth_pct_after_mark"].items():
        start = f["rss_mib_start"].get(key, float("nan"))
        mark, end = f["rss_mib_mark"][key], f["rss_mib_end"][key]
        print(f"  {key:<28} {start:>9.1f} {mark:>10.1f} {end:>9.1f} "
              f"{end - start:>+9.1f} {pct:>+10.1f}%")  # fmt: skip
    worst = f["rss_worst"]
    if worst is not None:
        verdict = "within" if f["rss_within_bound"] else "OVER"
        print(f"worst growth after the mark: {worst['process']} {worst['growth_pct']:+.1f}% "
              f"({verdict} the bound of {f['max_rss_growth_pct']:.0f}%)")  # fmt: skip


def run(name: str, url: str, info: ServerInfo, args: argparse.Namespace) -> dict:
    f = asyncio.run(_soak(url, info, args, name))
    print(f"{'=' * 20} soak ({name}, {args.duration_s:.0f} s) {'=' * 20}")
    print(f"completed {f['completed']}, failed {f['failed']}, "
          f"disconnected by the client {f['disconnected']}; "
          f"output {f['output_tok_s']:.1f} tok/s")  # fmt: skip
    for error in f["errors"]:
        print(f"  error: {error}")
    print(f"idle afterwards: {f['idle_after']}; blocks not back in their pool: "
          f"{f['leaked_blocks']} (must be 0)")  # fmt: skip
    print_memory(f)
    return f


def report(runs: dict[str, dict], args: argparse.Namespace) -> tuple[dict, bool]:
    ok = all(f["failed"] == 0 and f["leaked_blocks"] == 0 and f["idle_after"]
             and f["rss_within_bound"] for f in runs.values())  # fmt: skip
    keys = ("duration_s", "max_concurrency", "input_len", "output_len", "disconnect_prob",
            "settle_s", "max_rss_growth_pct")  # fmt: skip
    worst = {name: f["rss_worst"] for name, f in runs.items()}
    return {"workload": {k: getattr(args, k) for k in keys}, "rss_worst": worst,
            "deployments": runs}, ok  # fmt: skip
