"""`tandem bench serve --workload tracing`: what tracing every request costs.

Two disaggregated clusters run side by side, one with every stage tracing every request
(sampling ratio 1.0, spans to a trace file) and one without; the throughput load runs on
them in turn, interleaved, `--rounds` times each (only one cluster is loaded at a time; the
idle one only heartbeats). The figure is the ratio of the medians of output tok/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from tandem.services.observability.tracing import read_spans

TRACE_FILE = os.path.join(
    tempfile.gettempdir(), f"tandem-bench-trace-{os.getpid()}-{int(time.time())}.jsonl"
)
DEPLOYMENTS = {"tracing-off": [], "tracing-on": ["--trace-file", TRACE_FILE]}


def add_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--rounds", type=int, default=3, help="tracing, sampling: interleaved runs of each"
    )


def report(runs: dict[str, list[dict]], args: argparse.Namespace) -> tuple[dict, bool]:
    off = [r["output_tok_s"] for r in runs["tracing-off"]]
    on = [r["output_tok_s"] for r in runs["tracing-on"]]
    spans = read_spans(TRACE_FILE) if os.path.exists(TRACE_FILE) else []
    roots = sum(1 for s in spans if s["name"].startswith("POST "))
    requests = sum(r["completed"] + r["failed"] for r in runs["tracing-on"])
    ratio = statistics.median(on) / statistics.median(off)
    print(f"{'=' * 20} tracing cost {'=' * 20}")
    print(f"output tok/s, tracing off: {' '.join(f'{x:.1f}' for x in off)}  "
          f"(median {statistics.median(off):.1f})")  # fmt: skip
    print(f"output tok/s, tracing on:  {' '.join(f'{x:.1f}' for x in on)}  "
          f"(median {statistics.median(on):.1f})")  # fmt: skip
    print(f"ratio on / off (medians):  {ratio:.3f}  (target >= 0.95)")
    print(f"traced: {roots} request traces, {len(spans)} spans for {requests} requests "
          f"(warm-ups included) in {TRACE_FILE}")  # fmt: skip
    result = {
        "output_tok_s_tracing_off": off,
        "output_tok_s_tracing_on": on,
        "median_tok_s_tracing_off": statistics.median(off),
        "median_tok_s_tracing_on": statistics.median(on),
        "ratio": ratio,
        "num_traces": roots,
        "num_spans": len(spans),
        "workload": {
            k: getattr(args, k)
            for k in ("num_prompts", "input_len", "output_len", "max_concurrency", "rounds")
        },  # fmt: skip
        "deployments": runs,
    }
    ok = all(r["failed"] == 0 for rs in runs.values() for r in rs) and roots >= requests
    return result, ok
