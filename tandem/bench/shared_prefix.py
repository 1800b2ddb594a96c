"""`tandem bench serve --workload shared-prefix`: what cluster-wide prefix caching buys.

Requests start with one of `--num-system-prompts` (8) distinct system prompts of
`--system-len` (1,024) tokens, chosen at random, followed by a distinct `--user-len` (64)
token user turn. The cluster has 2 prefill and 2 decode workers whose KV caches each hold about
half of the system prompts at once, so where a request lands decides whether its prefix is
cached. The same load runs against three clusters, one after the other: kv-aware routing with
prefix caching, the same without prefix caching, and round-robin routing with caching. Then a
multi-turn chat variant on the kv-aware cluster: each conversation's turn extends the previous
turn's prompt with a reply and a new user turn.

Hit rate = prompt tokens served from the prefill workers' prefix caches / prompt tokens looked
up there, from the workers' counters in `/stats` before and after the load.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import httpx

from tandem.bench import plots
from tandem.bench.load import (
    SAMPLES,
    ServerInfo,
    client,
    latency_samples,
    random_token_ids,
    run_load,
    send_request,
    stats_ms,
    summarize,
)

# Each worker's cache: about 4 of the 8 system prompts (64 blocks of 16 each) plus room for
# the requests in flight.
NUM_BLOCKS = 4 * 64 + 96
CLUSTER = ["--prefill-workers", "2", "--decode-workers", "2", "--torch-threads", "1",
           "--num-gpu-blocks-override", str(NUM_BLOCKS), "--max-model-len", "2048"]  # fmt: skip
DEPLOYMENTS = {
    "kv-aware": [*CLUSTER, "--router", "kv-aware"],
    "no-cache": [*CLUSTER, "--router", "kv-aware", "--no-enable-prefix-caching"],
    "round-robin": [*CLUSTER, "--router", "round-robin"],
}


def add_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--num-system-prompts", type=int, default=8)
    g.add_argument("--system-len", type=int, default=1024)
    g.add_argument("--user-len", type=int, default=64)
    g.add_argument("--shared-output-len", type=int, default=16)
    g.add_argument("--shared-requests", type=int, default=64)
    g.add_argument("--shared-concurrency", type=int, default=4)
    g.add_argument("--conversations", type=int, default=4, help="multi-turn variant")
    g.add_argument("--turns", type=int, default=4, help="multi-turn variant")


def shared_prefix_prompts(
    n: int, num_systems: int, system_len: int, user_len: int, vocab: int, seed: int
) -> list[list[int]]:
    """`n` prompts: a random one of `num_systems` system prompts, then a distinct user turn."""
    rng = random.Random(seed)
    systems = [random_token_ids(rng, system_len, vocab) for _ in range(num_systems)]
    return [systems[rng.randrange(num_systems)] + random_token_ids(rng, user_len, vocab)
            for _ in range(n)]  # fmt: skip


def prefill_counters(url: str) -> tuple[int, int]:
    """(prompt tokens looked up, found) summed over the prefill workers."""
    workers = httpx.get(f"{url}/stats", timeout=10).json().get("workers", {})
    prefill = [w for w in workers.values() if w.get("role") == "prefill"]
    return (
        sum(w.get("prefix_cache_queries", 0) for w in prefill),
        sum(w.get("prefix_cache_hits", 0) for w in prefill),
    )


def settle(url: str, timeout: float = 30.0) -> None:
    """Wait for the workers to go idle and heartbeat once more, so counters are current."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = httpx.get(f"{url}/stats", timeout=10).json().get("workers", {})
        if not any(w.get("num_running") or w.get("num_waiting") for w in workers.values()):
            break
        time.sleep(0.2)
    time.sleep(0.6)


async def multi_turn(url: str, info: ServerInfo, args: argparse.Namespace) -> list[float]:
    """Conversations side by side, each turn after the previous one; TTFT of every turn
    after the first (seconds)."""
    rng = random.Random(args.seed + 1)
    vocab = info.vocab_size

    async def conversation(http: httpx.AsyncClient) -> list[float]:
        prompt = random_token_ids(rng, args.system_len, vocab)
        ttfts = []
        for turn in range(args.turns):
            prompt = prompt + random_token_ids(rng, args.user_len, vocab)
            result = await send_request(http, prompt, args.shared_output_len)
            if result.ok and turn:
                ttfts.append(result.ttft)
            # The client sends the reply back with the next turn.
            prompt = prompt + random_token_ids(rng, args.shared_output_len, vocab)
        return ttfts

    async with client(url, args.conversations) as http:
        per_conv = await asyncio.gather(*(conversation(http) for _ in range(args.conversations)))
    return [t for ttfts in per_conv for t in ttfts]


def run(name: str, url: str, info: ServerInfo, args: argparse.Namespace) -> dict:
    prompts = shared_prefix_prompts(
        args.shared_requests + 2, args.num_system_prompts, args.system_len, args.user_len,
        info.vocab_size, args.seed,
    )  # fmt: skip
    settle(url)
    queries0, hits0 = prefill_counters(url)
    load = run_load(url, prompts, args.shared_output_len, args.shared_concurrency, float("inf"),
                    args.seed, desc=name)  # fmt: skip
    results, duration = asyncio.run(load)
    settle(url)
    queries1, hits1 = prefill_counters(url)
    figures = summarize(results, duration)
    figures[SAMPLES] = latency_samples(results)
    figures["hit_rate"] = (hits1 - hits0) / (queries1 - queries0) if queries1 > queries0 else 0.0
    scheduler = httpx.get(f"{url}/stats", timeout=10).json().get("scheduler", {})
    figures["index_lookup_p50_ms"] = scheduler.get("index_lookup_p50_ms")
    if name == "kv-aware":
        figures["multi_turn_ttft_ms"] = stats_ms(asyncio.run(multi_turn(url, info, args)))
    ttft = figures["ttft_ms"]
    print(f"{'=' * 20} {name} {'=' * 20}")
    print(f"completed / failed: {figures['completed']} / {figures['failed']}")
    print(f"TTFT p50 / p99 (ms): {ttft['p50']:.1f} / {ttft['p99']:.1f}")
    print(f"prefix hit rate:     {figures['hit_rate']:.1%}")
    if figures["index_lookup_p50_ms"]:
        print(f"index lookup p50:    {figures['index_lookup_p50_ms']:.3f} ms")
    if "multi_turn_ttft_ms" in figures:
        mt = figures["multi_turn_ttft_ms"]
        print(f"multi-turn TTFT (turns 2+) p50 / p99 (ms): {mt['p50']:.1f} / {mt['p99']:.1f}")
    return figures


def plot(runs: dict[str, dict], samples: dict, args: argparse.Namespace, path) -> None:
    """TTFT and ITL CDFs and output tok/s of the three clusters."""
    title = (
        f"shared prefix: {args.shared_requests} requests on {args.num_system_prompts} system "
        f"prompts of {args.system_len} tokens, {args.shared_concurrency} at a time"
    )
    plots.plot_latency(samples, {name: f["output_tok_s"] for name, f in runs.items()}, path, title)


def report(runs: dict[str, dict], args: argparse.Namespace) -> tuple[dict, bool]:
    kv, no_cache, rr = (runs.get(k, {}) for k in ("kv-aware", "no-cache", "round-robin"))
    out = {
        "ttft_p50_ms": kv.get("ttft_ms", {}).get("p50"),
        "ttft_p50_ms_no_cache": no_cache.get("ttft_ms", {}).get("p50"),
        "hit_rate": kv.get("hit_rate"),
        "hit_rate_round_robin": rr.get("hit_rate"),
        "index_lookup_p50_ms": kv.get("index_lookup_p50_ms"),
        "params": {
            k: getattr(args, k)
            for k in (
                "num_system_prompts",
                "system_len",
                "user_len",
                "shared_output_len",
                "shared_requests",
                "shared_concurrency",
                "conversations",
                "turns",
            )
        },  # fmt: skip
        "deployments": runs,
    }
    if out["ttft_p50_ms"] and out["ttft_p50_ms_no_cache"]:
        speedup = out["ttft_p50_ms_no_cache"] / out["ttft_p50_ms"]
        print(f"TTFT p50 without cache / with: {speedup:.1f}x")
    if out["hit_rate"] is not None and out["hit_rate_round_robin"]:
        print(
            f"hit rate kv-aware / round-robin: {out['hit_rate'] / out['hit_rate_round_robin']:.2f}x"
        )
    return out, all(r.get("failed", 1) == 0 for r in runs.values())
