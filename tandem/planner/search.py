"""The recommendation: for each pool, the smallest replica count whose simulated percentile
meets its SLO, searched upwards from the utilisation bound."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from tandem.planner.profile import Profile
from tandem.planner.simulate import (
    PoolSim,
    check_fits,
    percentile,
    simulate_decode,
    simulate_prefill,
)
from tandem.planner.workload import Workload, measured


def format_seconds(seconds: float) -> str:
    """Milliseconds under a second, seconds above; what the reasons and the report print."""
    if not math.isfinite(seconds):
        return str(seconds)
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


@dataclass(frozen=True, slots=True)
class Slo:
    """pXX of TTFT over requests <= ttft_s; pXX of inter-token gaps over all tokens <= itl_s."""

    ttft_s: float
    itl_s: float
    ttft_percentile: float = 90.0
    itl_percentile: float = 90.0

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.itl_s <= 0:
            raise ValueError("SLOs must be > 0")
        if not (0 < self.ttft_percentile <= 100 and 0 < self.itl_percentile <= 100):
            raise ValueError("percentiles must be in (0, 100]")


@dataclass(slots=True)
class PoolPlan:
    """One pool's answer: its count (None when infeasible, with the reason), the utilisation
    bound it started from, and the simulated percentile and busy fraction around the count."""

    role: str  # prefill | decode
    metric: str  # TTFT | ITL
    percentile: float
    slo_s: float
    feasible: bool
    reason: str
    num_replicas: int | None
    lower_bound: int
    capacity_per_worker: float  # tokens/s: prompts at full steps; outputs at best_batch
    best_batch: int | None = None  # decode: the batch size used for the bound
    simulated: dict[int, dict] = field(default_factory=dict)  # n -> {latency_s, busy, batch}


@dataclass(slots=True)
class Plan:
    """Both pools' answers, the load they were planned for and the profile figures used."""

    prefill: PoolPlan
    decode: PoolPlan
    load: dict
    profile: dict

    @property
    def feasible(self) -> bool:
        return self.prefill.feasible and self.decode.feasible


def _smallest_meeting(lo: int, hi: int, meets: Callable[[int], bool]) -> int | None:
    """The smallest n in [lo, hi] with meets(n) (monotone in n), galloping then bisecting."""
    fail, probe, stride = lo - 1, lo, 1
    while not meets(probe):
        if probe >= hi:
            return None
        fail, probe, stride = probe, min(probe + stride, hi), stride * 2
    while probe - fail > 1:
        mid = (fail + probe) // 2
        fail, probe = (fail, mid) if meets(mid) else (mid, probe)
    return probe


def _search(plan: PoolPlan, simulate: Callable[[int], PoolSim], max_replicas: int) -> None:
    """Fill plan.num_replicas and plan.simulated (n-1, n, n+1) from the bound upwards."""
    cache: dict[int, float] = {}

    def latency(n: int) -> float:
        if n not in cache:
            sim = simulate(n)
            cache[n] = sim.percentile(plan.percentile)
            plan.simulated[n] = dict(
                latency_s=cache[n], busy=sim.busy_frac, mean_batch=sim.mean_batch
            )
        return cache[n]

    n = _smallest_meeting(plan.lower_bound, max_replicas, lambda n: latency(n) <= plan.slo_s)
    if n is None:
        plan.feasible = False
        worst = latency(max_replicas)
        plan.reason = (
            f"{max_replicas} replicas give p{plan.percentile:g} {plan.metric} "
            f"{format_seconds(worst)} > {format_seconds(plan.slo_s)} (raise --max-replicas?)"
        )
        return
    plan.num_replicas = n
    for m in (n - 1, n + 1):
        if m >= 1:
            latency(m)
    plan.simulated = dict(sorted(plan.simulated.items()))


def _infeasible(plan: PoolPlan, reason: str) -> None:
    plan.feasible, plan.reason = False, reason


def plan_prefill(
    profile: Profile, workload: Workload, slo: Slo, transfer: float, max_replicas: int
) -> tuple[PoolPlan, list[float]]:
    """The prefill pool, and each request's TTFT with it (alone, when no count meets the SLO).
    `transfer`: seconds of KV hand-off per prompt token, added to TTFT."""
    cap = profile.prefill_tokens_per_s
    bound = max(1, math.ceil(workload.rate * workload.mean_prompt_len / cap))
    plan = PoolPlan("prefill", "TTFT", slo.ttft_percentile, slo.ttft_s, True, "", None, bound, cap)
    budget, window = profile.max_num_batched_tokens, measured(len(workload.arrival_s))
    lone = [
        math.ceil(n / budget) * profile.prefill_a_s + (profile.prefill_b_s + transfer) * n
        for n in workload.prompt_lens
    ]
    lone_p = percentile([(lone[r], 1) for r in window], slo.ttft_percentile)
    if lone_p > slo.ttft_s:
        what = "prefill + KV transfer" if transfer else "prefill"
        _infeasible(
            plan,
            f"even alone, p{slo.ttft_percentile:g} TTFT is {format_seconds(lone_p)} ({what}) "
            f"> {format_seconds(slo.ttft_s)}",
        )
    elif bound > max_replicas:
        _infeasible(plan, f"the load needs at least {bound} > {max_replicas} replicas")
    else:
        run = partial(simulate_prefill, workload, profile=profile, transfer_s_per_token=transfer)
        _search(plan, run, max_replicas)
    if not plan.feasible:
        return plan, lone
    return plan, run(plan.num_replicas).ttft_s


def plan_decode(
    profile: Profile, workload: Workload, slo: Slo, ready_s: list[float], max_replicas: int
) -> PoolPlan:
    """The decode pool, for requests reaching it at ready_s. Its bound is Little's law at the
    batch size with the most tokens/s whose step still meets the ITL SLO."""
    mean_ctx = workload.mean_prompt_len + workload.mean_output_len / 2
    mean_len = workload.mean_prompt_len + workload.mean_output_len
    max_batch = max(
        1, min(profile.max_num_seqs, profile.num_blocks // math.ceil(mean_len / profile.block_size))
    )
    ok = [b for b in range(1, max_batch + 1) if profile.decode_step(b, mean_ctx) <= slo.itl_s]
    best = max(ok, key=lambda b: b / profile.decode_step(b, mean_ctx), default=1)
    per_worker = best / profile.decode_step(best, mean_ctx)
    bound = max(1, math.ceil(workload.rate * (workload.mean_output_len - 1) / per_worker))
    plan = PoolPlan(
        "decode", "ITL", slo.itl_percentile, slo.itl_s, True, "", None, bound, per_worker, best
    )
    if reason := check_fits(workload, profile):
        _infeasible(plan, reason)
    elif not ok:
        step1 = profile.decode_step(1, mean_ctx)
        _infeasible(
            plan,
            f"a decode step at batch 1 takes {format_seconds(step1)} (mean context {mean_ctx:.0f}) "
            f"> {format_seconds(slo.itl_s)}",
        )
    elif bound > max_replicas:
        _infeasible(plan, f"the load needs at least {bound} > {max_replicas} replicas")
    else:
        run = partial(simulate_decode, workload, profile=profile, ready_s=ready_s)
        _search(plan, run, max_replicas)
    return plan


def recommend(
    profile: Profile,
    workload: Workload,
    slo: Slo,
    kv_transfer_gbps: float | None = None,
    max_replicas: int = 64,
) -> Plan:
    """Smallest prefill and decode pools meeting the SLOs for this load (see the package doc).
    Decode is planned for the arrivals the recommended prefill pool makes."""
    transfer = 0.0
    if kv_transfer_gbps:
        transfer = profile.kv_bytes_per_token * 8 / (kv_transfer_gbps * 1e9)
    prefill, ttft = plan_prefill(profile, workload, slo, transfer, max_replicas)
    ready = [a + s for a, s in zip(workload.arrival_s, ttft)]
    decode = plan_decode(profile, workload, slo, ready, max_replicas)

    rate = workload.rate
    mean_ctx = workload.mean_prompt_len + workload.mean_output_len / 2
    load = dict(
        request_rate=rate,
        num_requests=len(workload.arrival_s),
        mean_prompt_len=workload.mean_prompt_len,
        mean_output_len=workload.mean_output_len,
        prompt_tok_s=rate * workload.mean_prompt_len,
        output_tok_s=rate * workload.mean_output_len,
        mean_decode_context=mean_ctx,
        kv_transfer_s_per_prompt=transfer * workload.mean_prompt_len,
    )
    figures = dict(
        prefill_a_s=profile.prefill_a_s,
        prefill_b_s_per_token=profile.prefill_b_s,
        max_num_batched_tokens=profile.max_num_batched_tokens,
        prefill_tokens_per_s=profile.prefill_tokens_per_s,
        decode_step_s_batch1=profile.decode_step(1, mean_ctx),
        decode_step_s_best_batch=profile.decode_step(decode.best_batch, mean_ctx),
        decode_contexts_measured=list(profile.context_range),
        max_num_seqs=profile.max_num_seqs,
        num_blocks=profile.num_blocks,
        block_size=profile.block_size,
        kv_bytes_per_token=profile.kv_bytes_per_token,
        machine=profile.machine,
    )
    return Plan(prefill, decode, load, figures)
