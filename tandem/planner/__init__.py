"""`tandem plan`: how many prefill and decode workers a load needs to meet TTFT and ITL SLOs.

As DistServe does, the two pools are planned apart, because disaggregation decouples them:
prefill workers only ever see prompts (TTFT), decode workers only ever see running requests
(inter-token latency). From one worker's profile (`tandem bench profile`), each pool is
simulated event by event under Poisson arrivals:

- prefill: each request goes to the worker with the fewest queued tokens; a worker runs steps
  of up to `max_num_batched_tokens` tokens taken first-come-first-served from its queue (a long
  prompt spans steps, short ones share a step); a step of T tokens takes `a + b*T` seconds.
  TTFT = queueing + the steps until the prompt's last chunk ends + the KV transfer estimate.
- decode: a request arrives when its first token is out and goes to the worker with the fewest
  requests; continuous batching gives every request in the batch one token per step, the step
  time read from the profile's table (batch size, mean context); the batch is capped by
  `max_num_seqs` and by KV blocks (a request reserves its whole length). Each token after the
  first is one ITL sample: the time since that request's previous token, waits included.

The count for a pool is the smallest n, from the utilisation bound up, whose simulated
percentile meets the SLO. Pure Python: no torch, only the profile's JSON.

Modules: `profile` (the worker's step times), `workload` (the load), `simulate` (the two
pools), `search` (the smallest counts), `report` (the plan as text), `command` (the CLI).
"""

from tandem.planner.command import add_plan_parser, cmd_plan
from tandem.planner.profile import Profile, fit_line, load_profile
from tandem.planner.report import format_plan
from tandem.planner.search import Plan, PoolPlan, Slo, plan_decode, plan_prefill, recommend
from tandem.planner.simulate import (
    PoolSim,
    check_fits,
    percentile,
    simulate_decode,
    simulate_prefill,
)
from tandem.planner.workload import (
    DistKind,
    LengthDist,
    Workload,
    make_workload,
    measured,
    parse_length_dist,
)

__all__ = [
    "DistKind",
    "LengthDist",
    "Plan",
    "PoolPlan",
    "PoolSim",
    "Profile",
    "Slo",
    "Workload",
    "add_plan_parser",
    "check_fits",
    "cmd_plan",
    "fit_line",
    "format_plan",
    "load_profile",
    "make_workload",
    "measured",
    "parse_length_dist",
    "percentile",
    "plan_decode",
    "plan_prefill",
    "recommend",
    "simulate_decode",
    "simulate_prefill",
]
