"""`tandem bench serve --workload soak`: steady mixed load with clients that walk away.

For `--duration-s`, `--max-concurrency` clients each send one streaming request after
another: prompts and outputs of random lengths (`--input-len` and `--output-len` are the
upper bounds), and with probability `--disconnect-prob` the client drops the connection at a
random point of the stream. Afterwards it waits for the server to go idle and reports
completed, failed (errors other than its own disconnects), disconnected, blocks not back
in their pool (must be 0), and each server process's resident memory at the start and end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time
from pathlib import Path

from tandem.bench.deploy import process_tree, server_root, short_name
from tandem.bench.load import ServerInfo, client, random_token_ids, send_request, wait_idle

DEPLOYMENTS = {"disaggregated": [], "colocated": ["--colocated"]}


def add_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--disconnect-prob", type=float, default=0.2,
                   help="soak: share of requests whose client leaves mid-stream")  # fmt: skip


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


async def _client(http, rng: random.Random, info: ServerInfo, args, until: float, counts):
    while time.perf_counter() < until:
        prompt = random_token_ids(rng, rng.randint(1, args.input_len), info.vocab_size)
        output_len = rng.randint(1, args.output_len)
        if rng.random() < args.disconnect_prob:  # leaves after a random share of the stream
            task = asyncio.create_task(send_request(http, prompt, output_len))
            await asyncio.sleep(rng.uniform(0.0, 0.05 * output_len))
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                counts["disconnected"] += 1
                continue
            result = task.result()
        else:
            result = await send_request(http, prompt, output_len)
        counts["completed" if result.ok else "failed"] += 1
        if not result.ok and len(counts["errors"]) < 10:
            counts["errors"].append(result.error)


async def _soak(url: str, info: ServerInfo, args) -> dict:
    counts = {"completed": 0, "failed": 0, "disconnected": 0, "errors": []}
    pids = server_processes(url)
    async with client(url, args.max_concurrency + 2) as http:
        await send_request(http, [1, 2, 3], 4)  # first-call costs out of the baseline
        before = rss_mib(pids)
        until = time.perf_counter() + args.duration_s
        rngs = [random.Random(f"{args.seed}-{i}") for i in range(args.max_concurrency)]
        await asyncio.gather(*(_client(http, r, info, args, until, counts) for r in rngs))
        idle = await wait_idle(http, 120)
        workers = (await http.get("/stats")).json()["workers"]
    after = rss_mib(pids)
    leaked = sum(w["num_blocks"] - w["num_free_blocks"] for w in workers.values())
    return counts | {
        "idle_after": idle,
        "leaked_blocks": leaked,
        "rss_mib_start": before,
        "rss_mib_end": after,
        "rss_growth_mib": {k: after[k] - v for k, v in before.items() if k in after},
    }


def run(name: str, url: str, info: ServerInfo, args: argparse.Namespace) -> dict:
    f = asyncio.run(_soak(url, info, args))
    print(f"{'=' * 20} soak ({name}, {args.duration_s:.0f} s) {'=' * 20}")
    print(f"completed {f['completed']}, failed {f['failed']}, "
          f"disconnected by the client {f['disconnected']}")  # fmt: skip
    for error in f["errors"]:
        print(f"  error: {error}")
    print(f"idle afterwards: {f['idle_after']}; blocks not back in their pool: "
          f"{f['leaked_blocks']} (must be 0)")  # fmt: skip
    print(f"  {'process':<28} {'RSS start':>10} {'end':>10} {'growth':>10}  (MiB)")
    for key, growth in f["rss_growth_mib"].items():
        print(f"  {key:<28} {f['rss_mib_start'][key]:>10.1f} "
              f"{f['rss_mib_end'][key]:>10.1f} {growth:>+10.1f}")  # fmt: skip
    return f


def report(runs: dict[str, dict], args: argparse.Namespace) -> tuple[dict, bool]:
    ok = all(f["failed"] == 0 and f["leaked_blocks"] == 0 and f["idle_after"]
             for f in runs.values())  # fmt: skip
    keys = ("duration_s", "max_concurrency", "input_len", "output_len", "disconnect_prob")
    return {"workload": {k: getattr(args, k) for k in keys}, "deployments": runs}, ok
