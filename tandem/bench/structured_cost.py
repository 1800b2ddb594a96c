"""`tandem bench serve --workload structured`: what a JSON-schema constraint costs.

On one disaggregated cluster: first the plain throughput load on the fresh server (what
`tandem bench serve` measures), then one constrained request (its grammar compiles cold on
each worker), then the throughput load unconstrained and with every request constrained by
SCHEMA, alternating, `--rounds` times each. Every load has prompts of its own, so none hits
the prefix cache. The figure is the ratio of the medians of output tok/s; from the workers'
/metrics it adds the bitmask time per decode step (over the constrained rounds) and the
compile times, cold and from the cache.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tandem.bench.load import (
    RequestResult,
    ServerInfo,
    client,
    random_prompts,
    run_load,
    send_request,
    summarize,
)
from tandem.services.observability.metrics_push import PUSH_INTERVAL

DEPLOYMENTS = {"disaggregated": []}
# Its shortest valid output is far past 128 tokens, so constrained requests run to
# `max_tokens` as the unconstrained ones do: 48 readings of 3 integers each, every integer
# at least one digit, and no token of the default model's vocabulary holds two digits.
# Every string and integer is bounded, so the output moves on through the structure.
READING = {
    "type": "object",
    "properties": {
        "t": {"type": "integer", "minimum": 0, "maximum": 9999},
        "x": {"type": "integer", "minimum": 0, "maximum": 999},
        "y": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"},
    },
    "required": ["t", "x", "y", "ok"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {
        "sensor": {"type": "string", "minLength": 8, "maxLength": 16},
        "readings": {"type": "array", "items": READING, "minItems": 48},
    },
    "required": ["sensor", "readings"],
    "additionalProperties": False,
}
CONSTRAINED = {"structured_outputs": {"json": SCHEMA}}
MODES = (("unconstrained", None), ("constrained", CONSTRAINED))

COMPILE = "tandem:structured_output_compile_seconds"
MASK = "tandem:structured_output_mask_seconds"
STEP = "tandem:engine_step_seconds"
BATCH = "tandem:batch_size"
DECODING_ROLES = ("decode", "colocated")
SETTLE_S = 2 * PUSH_INTERVAL + 0.5  # every stage has pushed its metrics since the load ended

# (sample name, role, worker, cache_hit) -> value: the histograms' _sum and _count samples
Totals = dict[tuple[str, str, str, str], float]


def scrape(url: str) -> Totals:
    """The gateway's /metrics, the sums and counts of the histograms this workload reads."""
    text = httpx.get(f"{url}/metrics", timeout=30.0).raise_for_status().text
    totals: Totals = {}
    for family in text_string_to_metric_families(text):
        if family.name not in (COMPILE, MASK, STEP, BATCH):
            continue
        for s in family.samples:
            if s.name.endswith(("_sum", "_count")):
                key = (s.name, s.labels.get("role", ""), s.labels.get("worker", ""),
                       s.labels.get("cache_hit", ""))  # fmt: skip
                totals[key] = s.value
    return totals


def settled_scrape(url: str) -> Totals:
    """/metrics once the load that just ended has reached it (stages push once a second)."""
    time.sleep(SETTLE_S)
    return scrape(url)


def add(into: Totals, after: Totals, before: Totals) -> None:
    """Add what the histograms gained from `before` to `after` into `into`."""
    for key, value in after.items():
        into[key] = into.get(key, 0.0) + value - before.get(key, 0.0)


def pooled(totals: Totals, family: str, roles=DECODING_ROLES) -> tuple[float, float]:
    """(sum, count) of a histogram over every worker of these roles."""

    def total(sample: str) -> float:
        return sum(v for (n, role, _, _), v in totals.items() if n == sample and role in roles)

    return total(f"{family}_sum"), total(f"{family}_count")


def compile_ms(totals: Totals, cache_hit: bool) -> dict[str, float]:
    """Mean compile wait in ms per worker ("role worker"), for workers that had one."""
    hit = str(cache_hit).lower()
    means = {}
    for (name, role, worker, label), count in sorted(totals.items()):
        if name == f"{COMPILE}_count" and label == hit and count > 0:
            total = totals[(f"{COMPILE}_sum", role, worker, label)]
            means[f"{role} {worker}"] = total / count * 1000.0
    return means


def decode_figures(totals: Totals) -> dict[str, float | None]:
    """The decoding workers' mean step, mean batch and bitmask time per masked step."""
    step_s, steps = pooled(totals, STEP)
    mask_s, masked_steps = pooled(totals, MASK)
    batch_sum, batch_steps = pooled(totals, BATCH)
    return {
        "step_ms": step_s / steps * 1000.0 if steps else None,
        "mean_batch": batch_sum / batch_steps if batch_steps else None,
        "mask_ms_per_step": mask_s / masked_steps * 1000.0 if masked_steps else None,
        "mask_share_of_step": mask_s / step_s if step_s else None,
        "num_steps": steps,
        "num_masked_steps": masked_steps,
    }


async def send_one(
    url: str, prompt: list[int], output_len: int, extra: dict
) -> tuple[RequestResult, str]:
    """One request on its own: (its RequestResult, its text)."""
    events: list[tuple[float, dict]] = []
    async with client(url, 1) as http:
        result = await send_request(http, prompt, output_len, events, extra)
    return result, "".join(c.get("text", "") for _, e in events for c in e.get("choices", []))


def run(name: str, url: str, info: ServerInfo, args: argparse.Namespace) -> dict:
    """The plain load, the first constrained request, then the alternated rounds; each load's
    figures, and the grammar figures from the histograms' gains (see the module doc)."""
    seeds = itertools.count(args.seed)  # prompts of its own for every load

    def load(extra: dict | None, desc: str) -> dict:
        prompts = random_prompts(args.num_prompts + 2, args.input_len, info.vocab_size, next(seeds))
        results, duration = asyncio.run(run_load(url, prompts, args.output_len,
                                                 args.max_concurrency, args.request_rate,
                                                 args.seed, extra, desc))  # fmt: skip
        return summarize(results, duration)

    plain = load(None, f"{name} plain")
    print(f"{name} plain (fresh server)  : {plain['output_tok_s']:.1f} output tok/s "
          f"({plain['completed']} completed, {plain['failed']} failed)")  # fmt: skip
    prompt = random_prompts(1, args.input_len, info.vocab_size, next(seeds))[0]
    before = settled_scrape(url)
    result, text = asyncio.run(send_one(url, prompt, args.output_len, CONSTRAINED))
    after, first = settled_scrape(url), {}
    add(first, after, before)
    before = after
    print(f"{name} first constrained request: {'ok' if result.ok else result.error}, "
          f"output {text[:60]!r}...")  # fmt: skip
    figures: dict[str, list[dict]] = {mode: [] for mode, _ in MODES}
    gained: dict[str, Totals] = {mode: {} for mode, _ in MODES}
    for round_ in range(args.rounds):
        for mode, extra in MODES:
            f = load(extra, f"{name} {mode}")
            after = settled_scrape(url)
            round_totals: Totals = {}
            add(round_totals, after, before)
            add(gained[mode], after, before)
            before = after
            f["decode"] = decode_figures(round_totals)
            figures[mode].append(f)
            mask = f["decode"]["mask_ms_per_step"]
            print(f"{name} round {round_ + 1} {mode:<13}: {f['output_tok_s']:.1f} output tok/s "
                  f"({f['completed']} completed, {f['failed']} failed), decode step "
                  f"{f['decode']['step_ms'] or 0:.1f} ms"
                  + (f", mask {mask:.2f} ms" if mask is not None else ""))  # fmt: skip
    return {
        "plain": plain,
        **figures,
        "first_request": {"ok": result.ok, "error": result.error, "output_head": text[:80]},
        "compile_ms_cold": compile_ms(first, cache_hit=False),
        "compile_ms_cached": compile_ms(gained["constrained"], cache_hit=True),
        "decode": {mode: decode_figures(gained[mode]) for mode, _ in MODES},
    }


def _mean(values: dict[str, float]) -> float | None:
    return statistics.mean(values.values()) if values else None


def _per_worker(values: dict[str, float]) -> str:
    return ", ".join(f"{worker} {ms:.2f}" for worker, ms in values.items())


def report(runs: dict[str, dict], args: argparse.Namespace) -> tuple[dict, bool]:
    """The ratios against their targets, the bitmask and compile figures; ok when every
    request went through and the constrained rounds were masked."""
    ((name, f),) = runs.items()
    plain = f["plain"]["output_tok_s"]
    unconstrained = [x["output_tok_s"] for x in f["unconstrained"]]
    constrained = [x["output_tok_s"] for x in f["constrained"]]
    ratio = statistics.median(constrained) / statistics.median(unconstrained)
    baseline_ratio = statistics.median(unconstrained) / plain if plain else None
    decode, plain_decode = f["decode"]["constrained"], f["decode"]["unconstrained"]
    cold, cached = _mean(f["compile_ms_cold"]), _mean(f["compile_ms_cached"])
    print(f"{'=' * 20} structured-output cost ({name}) {'=' * 20}")
    print(f"plain output tok/s (fresh server):  {plain:.1f}")
    print(f"unconstrained output tok/s:         {' '.join(f'{x:.1f}' for x in unconstrained)}")
    print(f"constrained output tok/s:           {' '.join(f'{x:.1f}' for x in constrained)}")
    print(f"ratio constrained / unconstrained (medians): {ratio:.3f}  (target >= 0.90)")
    if baseline_ratio is not None:
        print(f"unconstrained (median) / plain: {baseline_ratio:.3f}  (target >= 0.95: the "
              f"baseline not slowed)")  # fmt: skip
    if decode["mask_ms_per_step"] is not None:
        print(f"bitmask per decode step: {decode['mask_ms_per_step']:.2f} ms at mean batch "
              f"{decode['mean_batch'] or 0:.1f}, {decode['mask_share_of_step']:.1%} of the "
              f"{decode['step_ms'] or 0:.1f} ms step (unconstrained step "
              f"{plain_decode['step_ms'] or 0:.1f} ms)")  # fmt: skip
    for label, mean, key in (("first request", cold, "compile_ms_cold"),
                             ("from the cache", cached, "compile_ms_cached")):  # fmt: skip
        figure = "none measured" if mean is None else f"{mean:.2f} ms ({_per_worker(f[key])})"
        print(f"grammar compile, {label}: {figure}")
    result = {
        "ratio": ratio,
        "ratio_ok": ratio >= 0.9,
        "output_tok_s_plain": plain,
        "output_tok_s_unconstrained": unconstrained,
        "output_tok_s_constrained": constrained,
        "baseline_ratio": baseline_ratio,
        # one-sided: the plain load runs first, on a cold server, and tends to be the slowest
        "baseline_ok": baseline_ratio is not None and baseline_ratio >= 0.95,
        "mask_ms_per_step": decode["mask_ms_per_step"],
        "mask_share_of_step": decode["mask_share_of_step"],
        "decode_step_ms_constrained": decode["step_ms"],
        "decode_step_ms_unconstrained": plain_decode["step_ms"],
        "decode_batch_constrained": decode["mean_batch"],
        "compile_ms_cold": cold,
        "compile_ms_cached": cached,
        "compile_ms_cold_per_worker": f["compile_ms_cold"],
        "compile_ms_cached_per_worker": f["compile_ms_cached"],
        "schema": SCHEMA,
        "workload": {
            k: getattr(args, k)
            for k in ("num_prompts", "input_len", "output_len", "max_concurrency", "rounds")
        },  # fmt: skip
        "deployments": runs,
    }
    loads = [f["plain"], *f["unconstrained"], *f["constrained"]]
    ok = (all(x["failed"] == 0 for x in loads) and f["first_request"]["ok"]
          and decode["num_masked_steps"] > 0)  # fmt: skip
    return result, ok
