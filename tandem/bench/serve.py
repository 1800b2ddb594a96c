"""`tandem bench serve`: online serving load, like `vllm bench serve`.

Unless `--url` names a server, it starts `tandem serve` disaggregated, then `--colocated`, shows
where each one's processes sit on the cores, and drives the same workload at both:

- throughput (default): distinct random-token prompts at a Poisson rate and/or a concurrency
  cap, EOS ignored (exactly `--output-len` tokens each); TTFT, TPOT, ITL, E2E, throughput, and
  the ratio of output tok/s.
- interference: how much long prompts slow down requests that are decoding (interference.py).
- goodput: the highest request rate served within TTFT and ITL SLOs (goodput.py).
- shared-prefix: cluster-wide prefix caching and KV-aware routing (shared_prefix.py).
- tracing: throughput with every request traced against tracing off (tracing_cost.py).
- sampling: throughput with full sampling and every penalty against greedy (sampling_cost.py).
- structured: throughput with every request constrained by a JSON schema against unconstrained,
  bitmask time per step and grammar compile times (structured_cost.py).
- elastic: a decode worker joins and another drains under the throughput load (elastic.py).
- soak: steady mixed load with random client disconnects; failures, leaked blocks and memory
  growth per process (soak.py).
- fp8-kv: an FP8 KV cache against the model's dtype: KV bytes per hand-off, sequences admitted
  before the first preemption, a long-context decode step (fp8_kv.py).
- spec: speculative decoding against none, on input-grounded and random prompts at 1 and 8
  clients (spec_cost.py).
- lora: the throughput load spread over random LoRA adapters against the base model, and the
  LoRA share of a decode step (lora_cost.py).

A bar shows each load's progress on stderr when it is a terminal. `--plot` (by default next to
`--json`) draws the deployments side by side: latency CDFs and output throughput (throughput,
shared-prefix), ITL CDFs of both phases (interference), SLO attainment (goodput); plots.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import shlex
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from tandem.bench import (
    elastic,
    fp8_kv,
    goodput,
    interference,
    lora_cost,
    plots,
    sampling_cost,
    shared_prefix,
    soak,
    spec_cost,
    structured_cost,
    tracing_cost,
)
from tandem.bench.deploy import DEPLOYMENT_FLAGS, deployment, placement, print_placement
from tandem.bench.load import (
    SAMPLES,
    LatencySamples,
    ServerInfo,
    latency_samples,
    random_prompts,
    run_load,
    server_info,
    summarize,
)


class Workload(NamedTuple):
    """What a workload does on one server (its figures) and across them (the JSON report and
    whether every request went through)."""

    run: Callable[[str, str, ServerInfo, argparse.Namespace], dict]
    report: Callable[[dict[str, dict], argparse.Namespace], tuple[dict, bool]]
    # name -> `tandem serve` flags (or a function of the bench's flags that gives them)
    deployments: dict[str, list[str]] | Callable = DEPLOYMENT_FLAGS
    # every deployment started at once, the runs interleaved (`args.rounds` of each);
    # `report` then gets a list of figures per deployment
    interleaved: bool = False
    # draws the figures and the raw samples (by deployment) into a PNG: `--plot`
    plot: Callable[[dict[str, dict], dict[str, Any], argparse.Namespace, Path], None] | None = None


# -- throughput ------------------------------------------------------------------------------


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


def run_throughput(name: str, url: str, info: ServerInfo, args: argparse.Namespace) -> dict:
    """Drive one server with `--num-prompts` requests; its figures."""
    if info.max_model_len and args.input_len + args.output_len > info.max_model_len:
        raise ValueError(f"input_len + output_len must be <= max_model_len ({info.max_model_len})")
    prompts = random_prompts(args.num_prompts + 2, args.input_len, info.vocab_size, args.seed)
    load = run_load(url, prompts, args.output_len, args.max_concurrency, args.request_rate,
                    args.seed, desc=name)  # fmt: skip
    results, duration = asyncio.run(load)
    figures = summarize(results, duration)
    print_figures(name, figures)
    return figures | {SAMPLES: latency_samples(results)}


def report_throughput(runs: dict[str, dict], args: argparse.Namespace) -> tuple[dict, bool]:
    """The disaggregated figures up front, with the ratio to colocated output tok/s."""
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
    return report, all(r["failed"] == 0 for r in runs.values())


def plot_throughput(
    runs: dict[str, dict], samples: dict[str, LatencySamples], args: argparse.Namespace, path: Path
) -> None:
    """TTFT and ITL CDFs per deployment, and their output tok/s side by side."""
    rate = "" if math.isinf(args.request_rate) else f", Poisson {args.request_rate:g} req/s"
    title = (f"throughput: {args.num_prompts} requests of {args.input_len} -> {args.output_len} "
             f"tokens, at most {args.max_concurrency} in flight{rate}")  # fmt: skip
    plots.plot_latency(samples, {name: f["output_tok_s"] for name, f in runs.items()}, path, title)


WORKLOADS = {
    "throughput": Workload(run_throughput, report_throughput, plot=plot_throughput),
    "interference": Workload(interference.run, interference.report, plot=interference.plot),
    "goodput": Workload(goodput.run, goodput.report),  # its report draws its own plot
    "shared-prefix": Workload(
        shared_prefix.run, shared_prefix.report, shared_prefix.DEPLOYMENTS, plot=shared_prefix.plot
    ),
    "tracing": Workload(run_throughput, tracing_cost.report, tracing_cost.DEPLOYMENTS, True),
    "sampling": Workload(sampling_cost.run, sampling_cost.report, sampling_cost.DEPLOYMENTS),
    "structured": Workload(
        structured_cost.run, structured_cost.report, structured_cost.DEPLOYMENTS
    ),
    "elastic": Workload(elastic.run, elastic.report, elastic.DEPLOYMENTS),
    "soak": Workload(soak.run, soak.report, soak.DEPLOYMENTS),
    "fp8-kv": Workload(fp8_kv.run, fp8_kv.report, fp8_kv.DEPLOYMENTS),
    "spec": Workload(spec_cost.run, spec_cost.report, spec_cost.deployments),
    "lora": Workload(lora_cost.run, lora_cost.report, lora_cost.deployments),
}


# -- the command -----------------------------------------------------------------------------


def bench_one(name: str, url: str, pid: int | None, args: argparse.Namespace) -> dict:
    """Drive one server with the chosen workload; its figures (and placement, given a pid)."""
    info = server_info(url, args.model, args.vocab_size)
    rows = placement(pid) if pid is not None else []
    if rows:
        print_placement(name, rows)
    figures = WORKLOADS[args.workload].run(name, url, info, args)
    return figures | {"url": url, "placement": rows}


def bench_interleaved(names, known, server_args, args) -> dict[str, list[dict]]:
    """Start every deployment, then run the workload on each in turn, `args.rounds` times."""
    runs: dict[str, list[dict]] = {name: [] for name in names}
    with ExitStack() as stack:
        servers = {
            name: stack.enter_context(
                deployment([*server_args, *known[name]], args.startup_timeout)
            )
            for name in names
        }
        for round_ in range(args.rounds):
            for name in names:
                url, pid = servers[name]
                label = f"{name} (round {round_ + 1} of {args.rounds})"
                runs[name].append(bench_one(label, url, pid if round_ == 0 else None, args))
    return runs


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
        known = WORKLOADS[args.workload].deployments
        if callable(known):  # made from the workload's own flags
            known = known(args)
        names = [n.strip() for n in (args.deployments or ",".join(known)).split(",") if n.strip()]
        if not names or set(names) - known.keys():
            raise ValueError(f"deployments must be among {sorted(known)}: {names}")
        if WORKLOADS[args.workload].interleaved:
            runs = bench_interleaved(names, known, server_args, args)
        else:
            for name in names:
                flags = [*server_args, *known[name]]
                with deployment(flags, args.startup_timeout) as (url, pid):
                    runs[name] = bench_one(name, url, pid, args)
    samples = take_samples(runs)
    workload = WORKLOADS[args.workload]
    report, ok = workload.report(runs, args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    path = plots.plot_path(args)
    if workload.plot is not None and path is not None and samples:
        plots.try_plot(path, partial(workload.plot, runs, samples, args))
    return 0 if ok else 1


def take_samples(runs: dict[str, dict | list[dict]]) -> dict[str, Any]:
    """Take the raw samples out of each deployment's figures (they stay out of the JSON
    report): deployment -> its samples (of the first run, where runs are interleaved)."""
    samples = {}
    for name, figures in runs.items():
        for f in figures if isinstance(figures, list) else [figures]:
            if SAMPLES in f:
                samples.setdefault(name, f.pop(SAMPLES))
    return samples


def add_bench_serve_parser(bench_sub: argparse._SubParsersAction) -> None:
    """Add `serve` to the `tandem bench` subcommands."""
    p = bench_sub.add_parser("serve", help="online serving load: disaggregated vs colocated")
    p.add_argument("--workload", default="throughput", choices=sorted(WORKLOADS))
    p.add_argument("--url", default=None, help="drive this running server only (no comparison)")
    p.add_argument("--model", default=None, help="model folder (default: the server's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=None, help="default: the model's config")
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.add_argument(
        "--plot", default=None,
        help="write the plots (latency CDFs, throughput, goodput attainment) to this PNG "
        "(default: next to --json, same name, .png); needs matplotlib",
    )  # fmt: skip
    p.add_argument(
        "--server-args", default="", help='flags for both servers, e.g. "--dtype float32"'
    )
    p.add_argument("--deployments", default=None, help=argparse.SUPPRESS)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument(
        "--duration-s", type=float, default=60.0,
        help="interference: phase B (with long prompts); goodput: each rate's window",
    )  # fmt: skip
    g = p.add_argument_group("throughput workload")
    g.add_argument("--num-prompts", type=int, default=64)
    g.add_argument("--max-concurrency", type=int, default=32, help="in-flight cap (<= 0: none)")
    g.add_argument("--request-rate", type=float, default=math.inf, help="Poisson req/s")
    g.add_argument("--input-len", type=int, default=128)
    g.add_argument("--output-len", type=int, default=128)
    interference.add_arguments(p.add_argument_group("interference workload"))
    goodput.add_arguments(p.add_argument_group("goodput workload"))
    shared_prefix.add_arguments(p.add_argument_group("shared-prefix workload"))
    tracing_cost.add_arguments(p.add_argument_group("tracing workload"))
    soak.add_arguments(p.add_argument_group("soak workload"))
    fp8_kv.add_arguments(p.add_argument_group("fp8-kv workload"))
    spec_cost.add_arguments(p.add_argument_group("spec workload"))
    lora_cost.add_arguments(p.add_argument_group("lora workload"))
    p.add_argument_group("elastic workload").add_argument(
        "--join-after", type=float, default=10.0, help="seconds into the load a decode joins"
    )
    p.set_defaults(func=cmd_bench_serve)
