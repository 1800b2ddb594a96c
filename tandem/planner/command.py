"""The `tandem plan` subcommand: its arguments and what it runs."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from tandem.planner.profile import load_profile
from tandem.planner.report import format_plan
from tandem.planner.search import Slo, recommend
from tandem.planner.workload import make_workload, parse_length_dist


def cmd_plan(args: argparse.Namespace) -> int:
    workload = make_workload(
        args.request_rate,
        parse_length_dist(args.prompt_len),
        parse_length_dist(args.output_len),
        args.num_requests,
        args.seed,
    )
    slo = Slo(args.ttft_slo_ms / 1e3, args.itl_slo_ms / 1e3, args.ttft_percentile,
              args.itl_percentile)  # fmt: skip
    if args.max_replicas < 1:
        raise ValueError("--max-replicas must be >= 1")
    plan = recommend(
        load_profile(args.profile), workload, slo, args.kv_transfer_gbps, args.max_replicas
    )
    print(format_plan(plan))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(plan) | {"feasible": plan.feasible}, f, indent=2)
    return 0 if plan.feasible else 1


def add_plan_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `plan` to the `tandem` subcommands."""
    p = subparsers.add_parser(
        "plan", help="how many prefill and decode workers meet TTFT/ITL SLOs at a load"
    )
    p.add_argument("--profile", required=True, help="JSON written by `tandem bench profile`")
    p.add_argument("--request-rate", type=float, required=True, help="Poisson req/s")
    p.add_argument("--prompt-len", default="512", help="N, uniform:LO:HI or normal:MEAN:STD")
    p.add_argument(
        "--output-len", default="128", help="generated tokens (the first included), as above"
    )
    p.add_argument("--ttft-slo-ms", type=float, required=True)
    p.add_argument("--ttft-percentile", type=float, default=90.0)
    p.add_argument("--itl-slo-ms", type=float, required=True)
    p.add_argument("--itl-percentile", type=float, default=90.0)
    p.add_argument(
        "--kv-transfer-gbps",
        type=float,
        default=None,
        help="KV hand-off bandwidth in Gbit/s: adds the prompt's KV bytes / bandwidth to TTFT",
    )
    p.add_argument("--max-replicas", type=int, default=64)
    p.add_argument("--num-requests", type=int, default=4000, help="simulated requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the plan to this file")
    p.set_defaults(func=cmd_plan)
