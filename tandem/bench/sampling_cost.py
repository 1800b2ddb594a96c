"""`tandem bench serve --workload sampling`: what full sampling costs against greedy.

On one server, the throughput load runs greedy and then with random sampling and every
penalty on (temperature, top-k, top-p, min-p, presence, frequency and repetition
penalties), alternating, `--rounds` times each; the figure is the ratio of the medians of
output tok/s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics

from tandem.bench.load import ServerInfo, random_prompts, run_load, summarize

DEPLOYMENTS = {"disaggregated": []}
PENALIZED = {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "min_p": 0.02,
             "presence_penalty": 0.5, "frequency_penalty": 0.5,
             "repetition_penalty": 1.1}  # fmt: skip


def run(name: str, url: str, info: ServerInfo, args: argparse.Namespace) -> dict:
    prompts = random_prompts(args.num_prompts + 2, args.input_len, info.vocab_size, args.seed)
    figures: dict[str, list[dict]] = {"greedy": [], "penalized": []}
    for round_ in range(args.rounds):
        for mode, extra in (("greedy", None), ("penalized", PENALIZED)):
            load = run_load(url, prompts, args.output_len, args.max_concurrency,
                            args.request_rate, args.seed, extra, desc=f"{name} {mode}")  # fmt: skip
            results, duration = asyncio.run(load)
            f = summarize(results, duration)
            figures[mode].append(f)
            print(f"{name} round {round_ + 1} {mode:<9}: {f['output_tok_s']:.1f} output tok/s "
                  f"({f['completed']} completed, {f['failed']} failed)")  # fmt: skip
    return figures


def report(runs: dict[str, dict], args: argparse.Namespace) -> tuple[dict, bool]:
    ((name, figures),) = runs.items()
    greedy = [f["output_tok_s"] for f in figures["greedy"]]
    penalized = [f["output_tok_s"] for f in figures["penalized"]]
    ratio = statistics.median(penalized) / statistics.median(greedy)
    print(f"{'=' * 20} sampling cost ({name}) {'=' * 20}")
    print(f"greedy output tok/s:     {' '.join(f'{x:.1f}' for x in greedy)}")
    print(f"penalized output tok/s:  {' '.join(f'{x:.1f}' for x in penalized)}  {PENALIZED}")
    print(f"ratio penalized / greedy (medians): {ratio:.3f}  (target >= 0.90)")
    result = {
        "output_tok_s_greedy": greedy,
        "output_tok_s_penalized": penalized,
        "ratio": ratio,
        "penalized_params": PENALIZED,
        "workload": {
            k: getattr(args, k)
            for k in ("num_prompts", "input_len", "output_len", "max_concurrency", "rounds")
        },  # fmt: skip
        "deployments": runs,
    }
    ok = all(f["failed"] == 0 for f in figures["greedy"] + figures["penalized"])
    return result, ok
