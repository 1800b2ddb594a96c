"""`tandem bench serve --workload goodput`: the highest request rate served within the SLOs.

For each rate of `--rates` (ascending), requests arrive as a Poisson process for `--duration-s`
with prompt and output lengths uniform in their ranges (seeded by rate: every deployment gets
the same requests). A request meets the SLOs when its TTFT <= `--ttft-slo-ms` and its mean
inter-token gap (TPOT) <= `--itl-slo-ms`; a failed request misses them. Attainment is the
share of requests meeting both; goodput is the highest rate whose attainment reaches 90%. A
deployment's sweep stops once two rates in a row fall below 50% (higher ones would only fail
more slowly).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import dataclass
from functools import partial

from tandem.bench import plots
from tandem.bench.load import (
    RequestResult,
    ServerInfo,
    arrivals_within,
    client,
    random_token_ids,
    send_request,
    stats_ms,
    tpot,
    wait_idle,
    warm_up,
)
from tandem.bench.progress import RequestBar

TARGET = 0.9  # the attainment that counts a rate as served
STOP_BELOW = 0.5  # the sweep stops after STOP_AFTER rates in a row below this
STOP_AFTER = 2
CANCELLED = "cancelled: still running past its SLO deadline"
IDLE_TIMEOUT_S = 120.0
PARAMS = ("rates", "duration_s", "ttft_slo_ms", "itl_slo_ms", "min_input_len", "max_input_len",
          "min_output_len", "max_output_len", "seed")  # fmt: skip


def add_arguments(g: argparse._ArgumentGroup) -> None:
    """The workload's flags."""
    g.add_argument("--rates", default="0.25,0.5,1,2,4", help="req/s, swept in ascending order")
    g.add_argument("--ttft-slo-ms", type=float, default=3000.0)
    g.add_argument("--itl-slo-ms", type=float, default=150.0, help="on a request's mean gap")
    g.add_argument("--min-input-len", type=int, default=512)
    g.add_argument("--max-input-len", type=int, default=2048)
    g.add_argument("--min-output-len", type=int, default=64)
    g.add_argument("--max-output-len", type=int, default=256)


# -- pure helpers ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Slo:
    """The latency a request must stay within, in seconds."""

    ttft_s: float
    itl_s: float

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.itl_s <= 0:
            raise ValueError(f"SLOs must be positive: {self}")

    def met_by(self, result: RequestResult) -> bool:
        return result.ok and result.ttft <= self.ttft_s and tpot(result) <= self.itl_s

    def deadline(self, output_len: int) -> float:
        """Seconds after sending by which a request meeting the SLOs has finished."""
        return self.ttft_s + (output_len - 1) * self.itl_s


@dataclass(frozen=True, slots=True)
class TimedRequest:
    """A request of the load: when it is sent (seconds from the start), its prompt and length."""

    offset: float
    prompt: list[int]
    output_len: int


def parse_rates(text: str) -> list[float]:
    """ "0.25,0.5,1" -> [0.25, 0.5, 1.0], sorted ascending, each positive."""
    rates = sorted({float(r) for r in text.split(",") if r.strip()})
    if not rates or rates[0] <= 0:
        raise ValueError(f"rates must be positive numbers: {text!r}")
    return rates


def clip_lens(prompt_len: int, output_len: int, max_model_len: int) -> tuple[int, int]:
    """Shorten so prompt + output < max_model_len (0: no limit), keeping >= 1 output token."""
    if max_model_len <= 0:
        return prompt_len, output_len
    prompt_len = max(1, min(prompt_len, max_model_len - 2))
    return prompt_len, max(1, min(output_len, max_model_len - 1 - prompt_len))


def sample_requests(
    rate: float, duration_s: float, lens: tuple[int, int, int, int], info: ServerInfo, seed: int
) -> list[TimedRequest]:
    """Poisson arrivals over [0, duration_s); prompt and output lengths uniform in
    lens = (min_input, max_input, min_output, max_output), then clipped to the context."""
    min_in, max_in, min_out, max_out = lens
    if not 1 <= min_in <= max_in or not 1 <= min_out <= max_out:
        raise ValueError(f"length ranges must be 1 <= min <= max: {lens}")
    rng = random.Random(f"{seed}:goodput:{rate}")
    requests = []
    for offset in arrivals_within(duration_s, rate, f"{seed}:arrivals:{rate}"):
        prompt_len, output_len = clip_lens(
            rng.randint(min_in, max_in), rng.randint(min_out, max_out), info.max_model_len
        )
        prompt = random_token_ids(rng, prompt_len, info.vocab_size)
        requests.append(TimedRequest(offset, prompt, output_len))
    return requests


def rate_figures(rate: float, results: list[RequestResult], slo: Slo) -> dict:
    """One rate's counts, SLO attainment (failures count as misses) and latencies in ms."""
    done = [r for r in results if r.ok]
    met = sum(slo.met_by(r) for r in results)
    return {
        "rate": rate,
        "sent": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "cancelled": sum(r.error == CANCELLED for r in results),
        "met_slo": met,
        "attainment": met / len(results) if results else 0.0,
        "ttft_ms": stats_ms([r.ttft for r in done]),
        "tpot_ms": stats_ms([tpot(r) for r in done]),
        "errors": sorted({r.error for r in results if r.error})[:10],
    }


def goodput(attainment: dict[float, float], target: float = TARGET) -> float:
    """The highest rate whose attainment reaches the target; 0.0 if none does."""
    return max((rate for rate, a in attainment.items() if a >= target), default=0.0)


def stop_sweep(attainments: list[float]) -> bool:
    """True once the last STOP_AFTER rates all fell below STOP_BELOW."""
    last = attainments[-STOP_AFTER:]
    return len(last) == STOP_AFTER and all(a < STOP_BELOW for a in last)


# -- the load --------------------------------------------------------------------------------


async def _run_rate(
    url: str, requests: list[TimedRequest], slo: Slo, warm: list[list[int]], desc: str
) -> list[RequestResult]:
    """Send the requests on time, wait for them; cancel only what is past its SLO deadline.
    A bar named `desc` on a terminal's stderr."""
    if not requests:
        return []
    async with client(url, None) as http:
        if warm:
            await warm_up(http, warm, 2)
        await wait_idle(http, IDLE_TIMEOUT_S)
        with RequestBar(len(requests), desc) as bar:
            start = time.perf_counter()

            async def one(r: TimedRequest) -> RequestResult:
                await asyncio.sleep(max(0.0, start + r.offset - time.perf_counter()))
                bar.sent()
                result = await send_request(http, r.prompt, r.output_len)
                bar.done(result.ok)
                return result

            tasks = [asyncio.create_task(one(r)) for r in requests]
            # Nothing is cancelled before the last request's deadline: what still runs then has
            # missed its SLO whatever happens, and no cancellation eased the load on the others.
            end = start + max(r.offset + slo.deadline(r.output_len) for r in requests) + 1.0
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, end - time.perf_counter()))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return [RequestResult(False, error=CANCELLED) if t.cancelled() else t.result()
                for t in tasks]  # fmt: skip


def run(name: str, url: str, info: ServerInfo, args: argparse.Namespace) -> dict:
    """Sweep the rates on one server; its attainment per rate and its goodput."""
    slo = Slo(args.ttft_slo_ms / 1000.0, args.itl_slo_ms / 1000.0)
    rates = parse_rates(args.rates)
    lens = (args.min_input_len, args.max_input_len, args.min_output_len, args.max_output_len)
    warm_len, _ = clip_lens(args.max_input_len, 2, info.max_model_len)
    warm_rng = random.Random(f"{args.seed}:warm-up")  # prompts of their own: no cache hits
    warm = [random_token_ids(warm_rng, n, info.vocab_size) for n in (warm_len, 16)]
    print(f"{'=' * 20} goodput: {name} {'=' * 20}")
    print(f"SLOs: TTFT <= {args.ttft_slo_ms:g} ms, mean ITL <= {args.itl_slo_ms:g} ms; "
          f"{args.duration_s:g} s per rate; prompts {args.min_input_len}-{args.max_input_len}, "
          f"outputs {args.min_output_len}-{args.max_output_len} tokens")  # fmt: skip
    print(f"{'rate/s':>7} {'sent':>5} {'ok':>5} {'met':>5} {'attain':>7}   "
          f"{'TTFT (ms) p50':>13} {'p99':>8}   {'TPOT (ms) p50':>13} {'p99':>8}")  # fmt: skip
    rows: list[dict] = []
    skipped: list[float] = []
    for i, rate in enumerate(rates):
        if stop_sweep([row["attainment"] for row in rows]):
            skipped = rates[i:]
            print(f"stopped: {STOP_AFTER} rates in a row below {STOP_BELOW:.0%} attainment; "
                  f"skipped {', '.join(f'{r:g}' for r in skipped)} req/s")  # fmt: skip
            break
        requests = sample_requests(rate, args.duration_s, lens, info, args.seed)
        desc = f"{name} {rate:g} req/s"
        results = asyncio.run(_run_rate(url, requests, slo, warm if i == 0 else [], desc))
        row = rate_figures(rate, results, slo)
        rows.append(row)
        t, p = row["ttft_ms"], row["tpot_ms"]
        print(f"{rate:>7g} {row['sent']:>5} {row['completed']:>5} {row['met_slo']:>5} "
              f"{row['attainment']:>7.1%}   {t['p50']:>13.1f} {t['p99']:>8.1f}   "
              f"{p['p50']:>13.1f} {p['p99']:>8.1f}", flush=True)  # fmt: skip
        for error in row["errors"]:
            print(f"  error: {error}")
    best = goodput({row["rate"]: row["attainment"] for row in rows})
    print(f"goodput (>= {TARGET:.0%} attainment): {best:g} req/s")
    return {"goodput": best, "rates": rows, "skipped_rates": skipped}


# -- report ----------------------------------------------------------------------------------


def report(runs: dict[str, dict], args: argparse.Namespace) -> tuple[dict, bool]:
    """Attainment side by side, goodput per deployment, the plot; the JSON report."""
    rates = sorted({row["rate"] for f in runs.values() for row in f["rates"]})
    table = {name: {row["rate"]: row["attainment"] for row in f["rates"]}
             for name, f in runs.items()}  # fmt: skip
    print(f"{'=' * 20} goodput: summary {'=' * 20}")
    print(f"{'SLO attainment':<18}" + "".join(f"{name:>16}" for name in runs))
    for rate in rates:
        cells = [f"{t[rate]:.1%}" if rate in t else "skipped" for t in table.values()]
        print(f"{f'{rate:g} req/s':<18}" + "".join(f"{c:>16}" for c in cells))
    print(f"{'goodput (req/s)':<18}" + "".join(f"{f['goodput']:>16g}" for f in runs.values()))
    path, plot = plots.plot_path(args), None
    title = f"goodput: TTFT <= {args.ttft_slo_ms:g} ms, mean ITL <= {args.itl_slo_ms:g} ms"
    draw = partial(plots.plot_attainment, runs, TARGET, title=title)
    if path and plots.try_plot(path, draw):
        plot = str(path)
    result = {
        "workload": "goodput",
        "params": {k: getattr(args, k) for k in PARAMS}
        | {"rates": parse_rates(args.rates), "target_attainment": TARGET, "arrivals": "poisson"},
        "slo": {"ttft_ms": args.ttft_slo_ms, "itl_ms": args.itl_slo_ms},
        "goodput_disagg": runs.get("disaggregated", {}).get("goodput"),
        "goodput_colocated": runs.get("colocated", {}).get("goodput"),
        "attainment": {name: {f"{r:g}": a for r, a in t.items()} for name, t in table.items()},
        "plot": plot,
        "deployments": runs,
    }
    # Misses are the measurement; only errors other than SLO cancellations mean trouble.
    ok = all(row["failed"] == row["cancelled"] for f in runs.values() for row in f["rates"])
    return result, ok
