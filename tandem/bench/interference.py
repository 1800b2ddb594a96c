"""`tandem bench serve --workload interference`: how much long prompts slow down decoding.

A steady set of `--num-decoders` requests decodes throughout (each slot starts a new request as
soon as its last one finishes). Phase A measures their inter-token gaps alone for
`--baseline-s`; phase B, for `--duration-s`, adds long prompts at Poisson arrivals of
`--long-prompt-rate` per second (seeded: the same schedule for every deployment). A gap counts
in a phase only when both of its tokens arrived inside it. Disaggregation should keep phase B's
ITL close to phase A's, since the long prompts are prefilled on another worker.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

import httpx

from tandem.bench import plots
from tandem.bench.load import (
    SAMPLES,
    RequestResult,
    ServerInfo,
    arrivals_within,
    client,
    content_times,
    random_token_ids,
    send_request,
    stats_ms,
    warm_up,
)
from tandem.bench.progress import tick_seconds

PARAMS = ("num_decoders", "decode_input_len", "decode_output_len", "long_input_len",
          "long_output_len", "long_prompt_rate", "baseline_s", "warmup_s", "duration_s",
          "seed")  # fmt: skip
ALL_DECODING_TIMEOUT_S = 300.0


def add_arguments(g: argparse._ArgumentGroup) -> None:
    """The workload's flags."""
    g.add_argument("--num-decoders", type=int, default=16, help="requests kept decoding")
    g.add_argument("--decode-input-len", type=int, default=32)
    g.add_argument("--decode-output-len", type=int, default=512)
    g.add_argument("--long-input-len", type=int, default=1024)
    g.add_argument("--long-output-len", type=int, default=16)
    g.add_argument("--long-prompt-rate", type=float, default=0.5, help="Poisson, per second")
    g.add_argument("--baseline-s", type=float, default=20.0, help="phase A: decoders alone")
    g.add_argument("--warmup-s", type=float, default=5.0, help="decoding before phase A")


# -- pure helpers ----------------------------------------------------------------------------


def gaps_within(streams: list[list[float]], start: float, end: float) -> list[float]:
    """Inter-token gaps, per stream of token times, whose both tokens lie in [start, end]."""
    return [b - a for times in streams for a, b in zip(times, times[1:]) if start <= a and b <= end]


def first_output_lens(num_decoders: int, output_len: int) -> list[int]:
    """Each slot's first request is shorter, staggered over (0, output_len]: later requests
    then finish, and new ones prefill, one slot at a time rather than all in lockstep."""
    return [max(1, round(output_len * (i + 1) / num_decoders)) for i in range(num_decoders)]


def phase_figures(streams: list[list[float]], start: float, end: float) -> dict:
    """A phase's decode figures: its length, gaps, decode tok/s, ITL stats (and max) in ms."""
    gaps = gaps_within(streams, start, end)
    num_tokens = sum(start <= t <= end for times in streams for t in times)
    duration = end - start
    return {
        "duration_s": duration,
        "num_gaps": len(gaps),
        "decode_tok_s": num_tokens / duration if duration > 0 else 0.0,
        "itl_ms": stats_ms(gaps) | {"max": max(gaps, default=0.0) * 1000.0},
    }


def step_rates(before: dict, after: dict, seconds: float) -> dict[str, dict]:
    """Each worker's engine steps per second between two `/stats` snapshots: whether the
    workers slowed down, or only the path that relays their tokens to the client."""
    then = before.get("workers", {})
    rates = {}
    for worker_id, now in after.get("workers", {}).items():
        if worker_id in then and seconds > 0:
            steps = now.get("num_steps", 0) - then[worker_id].get("num_steps", 0)
            rates[worker_id] = {"role": now.get("role"), "steps_per_s": steps / seconds}
    return rates


def find_key(obj: Any, key: str) -> Any:
    """The value under `key` anywhere in nested dicts and lists, or None."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        children = obj.values()
    elif isinstance(obj, list):
        children = obj
    else:
        return None
    for child in children:
        found = find_key(child, key)
        if found is not None:
            return found
    return None


def kv_transfer_share(kv_transfer: Any, ttft_mean_ms: float) -> float | None:
    """The KV transfer's share of the long prompts' TTFT, from a `/stats` `kv_transfer` entry:
    its `share_of_ttft`, else its `mean_ms` over the mean TTFT; None when it has neither."""
    if not isinstance(kv_transfer, dict):
        return None
    if isinstance(kv_transfer.get("share_of_ttft"), int | float):
        return float(kv_transfer["share_of_ttft"])
    mean_ms = kv_transfer.get("mean_ms")
    if isinstance(mean_ms, int | float) and ttft_mean_ms > 0:
        return mean_ms / ttft_mean_ms
    return None


def ratio(b: float, a: float) -> float | None:
    return b / a if a > 0 else None


# -- the load --------------------------------------------------------------------------------


async def _stats(http: httpx.AsyncClient) -> dict:
    return (await http.get("/stats")).raise_for_status().json()


async def _drive(url: str, info: ServerInfo, args: argparse.Namespace, name: str) -> dict:
    """Warm up, start the decoders, time phases A and B; the raw streams and results. A bar
    of the seconds on a terminal's stderr."""
    decode_rng = random.Random(f"{args.seed}:decoders")
    long_rng = random.Random(f"{args.seed}:long")
    offsets = arrivals_within(args.duration_s, args.long_prompt_rate, f"{args.seed}:arrivals")
    long_prompts = [random_token_ids(long_rng, args.long_input_len, info.vocab_size)
                    for _ in offsets]  # fmt: skip
    streams: list[list[tuple[float, dict]]] = []  # every decoder request's events, in order
    decoded: list[RequestResult] = []  # decoder requests that finished

    async with client(url, None) as http:
        warm_rng = random.Random(f"{args.seed}:warm-up")  # prompts of their own: no cache hits
        warm = [random_token_ids(warm_rng, n, info.vocab_size)
                for n in (args.decode_input_len, args.long_input_len)]  # fmt: skip
        await warm_up(http, warm, 2)

        async def slot(first_len: int) -> None:
            output_len = first_len
            while True:
                events: list[tuple[float, dict]] = []
                streams.append(events)
                prompt = random_token_ids(decode_rng, args.decode_input_len, info.vocab_size)
                decoded.append(await send_request(http, prompt, output_len, events))
                if not decoded[-1].ok:
                    await asyncio.sleep(0.5)  # do not spin on a failing server
                output_len = args.decode_output_len

        slots = [asyncio.create_task(slot(n))
                 for n in first_output_lens(args.num_decoders, args.decode_output_len)]  # fmt: skip
        phase = ["warm-up"]
        longs: list[asyncio.Task] = []

        def status() -> str:
            done = sum(t.done() for t in longs)
            return (f"{phase[0]}; decoder requests done {sum(r.ok for r in decoded)}, "
                    f"long prompts done {done}/{len(offsets)}")  # fmt: skip

        total_s = args.warmup_s + args.baseline_s + args.duration_s
        tasks = slots  # cancelled at the end: the decoders, and the bar once it runs
        try:
            deadline = time.perf_counter() + ALL_DECODING_TIMEOUT_S
            while not all(content_times(s) for s in streams[: args.num_decoders]):
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"decoders not all decoding: {decoded[-1:]}")
                await asyncio.sleep(0.05)
            bar = tick_seconds(total_s, f"interference {name}", status)
            tasks = [*slots, asyncio.create_task(bar)]
            await asyncio.sleep(args.warmup_s)
            a_start, stats_a = time.perf_counter(), await _stats(http)
            phase[0] = "phase A"
            await asyncio.sleep(args.baseline_s)
            b_start, stats_b = time.perf_counter(), await _stats(http)
            phase[0] = "phase B"

            async def long_prompt(offset: float, prompt: list[int]) -> RequestResult:
                await asyncio.sleep(max(0.0, b_start + offset - time.perf_counter()))
                return await send_request(http, prompt, args.long_output_len)

            longs += [asyncio.create_task(long_prompt(o, p)) for o, p in zip(offsets, long_prompts)]
            await asyncio.sleep(max(0.0, b_start + args.duration_s - time.perf_counter()))
            b_end, stats_end = time.perf_counter(), await _stats(http)
            long_results = await asyncio.gather(*longs)  # each sent before b_end
            stats = await _stats(http)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return {"streams": [content_times(s) for s in streams], "decoded": decoded,
            "long": long_results, "stats": stats, "phases": (a_start, b_start, b_end),
            "steps": {"phase_a": step_rates(stats_a, stats_b, b_start - a_start),
                      "phase_b": step_rates(stats_b, stats_end, b_end - b_start)}}  # fmt: skip


def run(name: str, url: str, info: ServerInfo, args: argparse.Namespace) -> dict:
    """Drive one server; its figures per phase, the long prompts' TTFT, the ITL p99 ratio."""
    if info.max_model_len and args.long_input_len + args.long_output_len > info.max_model_len:
        raise ValueError(f"long prompts must fit max_model_len ({info.max_model_len})")
    raw = asyncio.run(_drive(url, info, args, name))
    a_start, b_start, b_end = raw["phases"]
    phase_a = phase_figures(raw["streams"], a_start, b_start)
    phase_b = phase_figures(raw["streams"], b_start, b_end)
    long_ok = [r for r in raw["long"] if r.ok]
    ttft_ms = stats_ms([r.ttft for r in long_ok])
    kv_transfer = find_key(raw["stats"], "kv_transfer")
    decoded = raw["decoded"]
    figures = {
        "phase_a": phase_a,
        "phase_b": phase_b,
        "itl_p99_ratio": ratio(phase_b["itl_ms"]["p99"], phase_a["itl_ms"]["p99"]),
        "itl_p50_ratio": ratio(phase_b["itl_ms"]["p50"], phase_a["itl_ms"]["p50"]),
        "long_prompts": {
            "sent": len(raw["long"]),
            "completed": len(long_ok),
            "failed": len(raw["long"]) - len(long_ok),
            "ttft_ms": ttft_ms,
            "errors": sorted({r.error for r in raw["long"] if r.error})[:10],
        },
        "decoders": {
            "completed": sum(r.ok for r in decoded),
            "failed": sum(not r.ok for r in decoded),
            "errors": sorted({r.error for r in decoded if r.error})[:10],
        },
        "worker_steps_per_s": raw["steps"],
        "kv_transfer": kv_transfer,
        "kv_transfer_share_of_ttft": kv_transfer_share(kv_transfer, ttft_ms["mean"]),
    }
    print_figures(name, figures, args)
    gaps = {"phase_a": gaps_within(raw["streams"], a_start, b_start),
            "phase_b": gaps_within(raw["streams"], b_start, b_end)}  # fmt: skip
    return figures | {SAMPLES: gaps}


# -- report ----------------------------------------------------------------------------------


def plot(runs: dict[str, dict], samples: dict[str, dict], args: argparse.Namespace, path) -> None:
    """Each deployment's decode ITL CDF, phase A against phase B."""
    title = (f"interference: {args.num_decoders} decoders; long prompts of {args.long_input_len} "
             f"tokens at {args.long_prompt_rate:g}/s in phase B")  # fmt: skip
    ratios = {name: f["itl_p99_ratio"] for name, f in runs.items()}
    plots.plot_interference(samples, ratios, path, title)


def print_figures(name: str, f: dict, args: argparse.Namespace) -> None:
    print(f"{'=' * 20} interference: {name} {'=' * 20}")
    print(f"decoders: {args.num_decoders} x ({args.decode_input_len}-token prompt -> "
          f"{args.decode_output_len} tokens); long prompts: {args.long_input_len} -> "
          f"{args.long_output_len} tokens, Poisson {args.long_prompt_rate:g}/s")  # fmt: skip
    print(f"{'phase':<18} {'s':>6} {'gaps':>7} {'dec tok/s':>9}   "
          f"{'ITL (ms) p50':>12} {'p90':>8} {'p99':>8} {'max':>8}")  # fmt: skip
    for label, key in (("A decode only", "phase_a"), ("B + long prompts", "phase_b")):
        p, itl = f[key], f[key]["itl_ms"]
        print(f"{label:<18} {p['duration_s']:>6.1f} {p['num_gaps']:>7} {p['decode_tok_s']:>9.1f}"
              f"   {itl['p50']:>12.2f} {itl['p90']:>8.2f} {itl['p99']:>8.2f} "
              f"{itl['max']:>8.2f}")  # fmt: skip
    r = f["itl_p99_ratio"]
    print(f"ITL p99 ratio B/A: {r:.2f}x" if r is not None else "ITL p99 ratio B/A: n/a")
    lp, ttft = f["long_prompts"], f["long_prompts"]["ttft_ms"]
    print(
        f"long prompts: {lp['sent']} sent, {lp['completed']} ok, {lp['failed']} failed; "
        f"TTFT p50 {ttft['p50']:.1f} ms, p99 {ttft['p99']:.1f} ms"
    )
    steps_a, steps_b = f["worker_steps_per_s"]["phase_a"], f["worker_steps_per_s"]["phase_b"]
    for worker_id, b in steps_b.items():
        a = steps_a.get(worker_id, {}).get("steps_per_s", 0.0)
        print(f"{b['role']} worker {worker_id}: {a:.1f} -> {b['steps_per_s']:.1f} steps/s (A -> B)")
    d = f["decoders"]
    print(f"decoder requests finished: {d['completed']} ok, {d['failed']} failed")
    for error in lp["errors"] + d["errors"]:
        print(f"  error: {error}")


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def report(runs: dict[str, dict], args: argparse.Namespace) -> tuple[dict, bool]:
    """Side by side; the JSON report with the ITL p99 ratio of each deployment."""
    rows = [
        ("ITL p50, A (ms)", lambda f: f["phase_a"]["itl_ms"]["p50"], ".2f"),
        ("ITL p99, A (ms)", lambda f: f["phase_a"]["itl_ms"]["p99"], ".2f"),
        ("ITL p50, B (ms)", lambda f: f["phase_b"]["itl_ms"]["p50"], ".2f"),
        ("ITL p99, B (ms)", lambda f: f["phase_b"]["itl_ms"]["p99"], ".2f"),
        ("ITL p99 B/A", lambda f: f["itl_p99_ratio"], ".2f"),
        ("long TTFT p50 (ms)", lambda f: f["long_prompts"]["ttft_ms"]["p50"], ".1f"),
        ("long TTFT p99 (ms)", lambda f: f["long_prompts"]["ttft_ms"]["p99"], ".1f"),
        ("KV transfer / TTFT", lambda f: f["kv_transfer_share_of_ttft"], ".3f"),
    ]
    print(f"{'=' * 20} interference: summary {'=' * 20}")
    print(f"{'':<20}" + "".join(f"{name:>16}" for name in runs))
    for label, get, spec in rows:
        print(f"{label:<20}" + "".join(f"{_fmt(get(f), spec):>16}" for f in runs.values()))
    disagg = runs.get("disaggregated", {})
    result = {
        "workload": "interference",
        "params": {k: getattr(args, k) for k in PARAMS} | {"arrivals": "poisson"},
        "itl_p99_ratio_disagg": disagg.get("itl_p99_ratio"),
        "itl_p99_ratio_colocated": runs.get("colocated", {}).get("itl_p99_ratio"),
        "kv_transfer_share_of_ttft": disagg.get("kv_transfer_share_of_ttft"),
        "deployments": runs,
    }
    ok = all(f["long_prompts"]["failed"] == 0 and f["decoders"]["failed"] == 0
             for f in runs.values())  # fmt: skip
    return result, ok
