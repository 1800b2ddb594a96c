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
"""

from __future__ import annotations

import argparse
import bisect
import enum
import json
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial

# -- the profile -------------------------------------------------------------------------------


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least squares `y = a + b*x` with a >= 0 (a negative intercept is noise: refit through
    the origin). One distinct x: a line through the origin."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx > 0:
        b = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
        a = mean_y - b * mean_x
        if a >= 0 and b > 0:
            return a, b
    return 0.0, sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Linear through the two nearest points (extrapolating past either end)."""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_right(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _batch_step(batches: Sequence[int], steps: Sequence[float], batch_size: int) -> float:
    # kept above zero: noisy points can make a line extrapolate below it
    return max(_interp(batches, steps, batch_size), 0.1 * steps[0])


@dataclass(frozen=True, slots=True)
class Profile:
    """One worker's measured capacity: what `tandem bench profile` writes."""

    prefill_a_s: float  # a prefill step of T tokens takes a + b*T seconds
    prefill_b_s: float
    max_num_batched_tokens: int
    decode_step_s: dict[int, dict[int, float]]  # context_len -> batch size -> step seconds
    block_size: int
    num_blocks: int
    max_num_seqs: int
    max_model_len: int
    kv_bytes_per_token: int
    machine: dict = field(default_factory=dict)
    _contexts: tuple = field(init=False, repr=False, compare=False)
    _points: tuple = field(init=False, repr=False, compare=False)  # per context: (batches, steps)
    _steps: tuple = field(init=False, repr=False, compare=False)  # per context: step by batch

    def __post_init__(self) -> None:
        if self.prefill_a_s < 0 or self.prefill_b_s <= 0:
            raise ValueError("profile: prefill step needs a >= 0 and b > 0")
        if not self.decode_step_s or not all(self.decode_step_s.values()):
            raise ValueError("profile: the decode table is empty")
        for table in self.decode_step_s.values():
            if any(b < 1 or s <= 0 for b, s in table.items()):
                raise ValueError("profile: decode batch sizes must be >= 1 and times > 0")
        for name in ("max_num_batched_tokens", "block_size", "num_blocks", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"profile: {name} must be >= 1")
        contexts = sorted(self.decode_step_s)
        points = [tuple(zip(*sorted(self.decode_step_s[c].items()))) for c in contexts]
        # Every batch size a worker can run, read off once: the simulations ask per step.
        steps = [
            [_batch_step(bs, ss, b) for b in range(self.max_num_seqs + 1)] for bs, ss in points
        ]
        object.__setattr__(self, "_contexts", tuple(contexts))
        object.__setattr__(self, "_points", tuple(points))
        object.__setattr__(self, "_steps", tuple(steps))

    @classmethod
    def from_json(cls, data: dict) -> Profile:
        cap, prefill = data["capacity"], data["prefill"]
        return cls(
            prefill_a_s=prefill["fit"]["a_s"],
            prefill_b_s=prefill["fit"]["b_s_per_token"],
            max_num_batched_tokens=cap["max_num_batched_tokens"],
            decode_step_s={
                int(ctx): {int(b): float(s) for b, s in table.items()}
                for ctx, table in data["decode"]["step_s"].items()
            },
            block_size=cap["block_size"],
            num_blocks=cap["num_blocks"],
            max_num_seqs=cap["max_num_seqs"],
            max_model_len=cap["max_model_len"],
            kv_bytes_per_token=cap["kv_bytes_per_token"],
            machine=data.get("machine", {}),
        )

    def prefill_step(self, num_tokens: int) -> float:
        return self.prefill_a_s + self.prefill_b_s * num_tokens

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens per second of one worker running full steps."""
        return self.max_num_batched_tokens / self.prefill_step(self.max_num_batched_tokens)

    @property
    def context_range(self) -> tuple[int, int]:
        return self._contexts[0], self._contexts[-1]

    def decode_step(self, batch_size: int, context_len: float) -> float:
        """Seconds of a decode step: linear in batch size (extrapolated past the largest
        measured batch from the last two points), linear between measured context lengths
        (the nearest one outside them)."""
        cs = self._contexts
        if context_len <= cs[0] or len(cs) == 1:
            return self._step_at(0, batch_size)
        if context_len >= cs[-1]:
            return self._step_at(len(cs) - 1, batch_size)
        i = bisect.bisect_right(cs, context_len)
        y0, y1 = self._step_at(i - 1, batch_size), self._step_at(i, batch_size)
        return y0 + (y1 - y0) * (context_len - cs[i - 1]) / (cs[i] - cs[i - 1])

    def _step_at(self, k: int, batch_size: int) -> float:
        if batch_size < len(self._steps[k]):
            return self._steps[k][batch_size]
        return _batch_step(*self._points[k], batch_size)


def load_profile(path: str) -> Profile:
    with open(path) as f:
        return Profile.from_json(json.load(f))


# -- the load ----------------------------------------------------------------------------------


class DistKind(enum.Enum):
    FIXED = "fixed"
    UNIFORM = "uniform"
    NORMAL = "normal"


@dataclass(frozen=True, slots=True)
class LengthDist:
    """Token counts: `N` (fixed), `uniform:LO:HI` (integers, both ends included) or
    `normal:MEAN:STD` (rounded, clipped to >= 1)."""

    kind: DistKind
    a: float  # N, LO or MEAN
    b: float = 0.0  # HI or STD

    def sample(self, rng: random.Random) -> int:
        if self.kind is DistKind.FIXED:
            return int(self.a)
        if self.kind is DistKind.UNIFORM:
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.gauss(self.a, self.b)))

    def __str__(self) -> str:
        if self.kind is DistKind.FIXED:
            return str(int(self.a))
        if self.kind is DistKind.UNIFORM:
            return f"uniform:{int(self.a)}:{int(self.b)}"
        return f"normal:{self.a:g}:{self.b:g}"


def parse_length_dist(text: str) -> LengthDist:
    """`N`, `uniform:LO:HI` or `normal:MEAN:STD`; ValueError naming the text otherwise."""
    usage = f"bad length distribution {text!r}: expected N, uniform:LO:HI or normal:MEAN:STD"
    parts = text.strip().split(":")
    try:
        if len(parts) == 1:
            dist = LengthDist(DistKind.FIXED, int(parts[0]))
            ok = dist.a >= 1
        elif parts[0] == "uniform" and len(parts) == 3:
            dist = LengthDist(DistKind.UNIFORM, int(parts[1]), int(parts[2]))
            ok = 1 <= dist.a <= dist.b
        elif parts[0] == "normal" and len(parts) == 3:
            dist = LengthDist(DistKind.NORMAL, float(parts[1]), float(parts[2]))
            ok = dist.a >= 1 and dist.b >= 0 and math.isfinite(dist.a + dist.b)
        else:
            raise ValueError(usage)
    except ValueError:
        raise ValueError(usage) from None
    if not ok:
        raise ValueError(f"{usage} (lengths >= 1, LO <= HI, STD >= 0)")
    return dist


@dataclass(frozen=True, slots=True)
class Workload:
    """Requests in arrival order (Poisson arrivals, sampled lengths); output lengths count
    every generated token, the first (made by prefill) included."""

    rate: float  # requests per second, the Poisson process's
    arrival_s: list[float]
    prompt_lens: list[int]
    output_lens: list[int]

    @property
    def mean_prompt_len(self) -> float:
        return sum(self.prompt_lens) / len(self.prompt_lens)

    @property
    def mean_output_len(self) -> float:
        return sum(self.output_lens) / len(self.output_lens)


def make_workload(
    rate: float, prompt_len: LengthDist, output_len: LengthDist, num_requests: int, seed: int
) -> Workload:
    if rate <= 0 or num_requests < 1:
        raise ValueError("request rate must be > 0 and the number of requests >= 1")
    rng = random.Random(seed)
    t, arrivals = 0.0, []
    for _ in range(num_requests):
        t += rng.expovariate(rate)
        arrivals.append(t)
    prompts = [prompt_len.sample(rng) for _ in range(num_requests)]
    outputs = [output_len.sample(rng) for _ in range(num_requests)]
    return Workload(rate, arrivals, prompts, outputs)


def measured(num_requests: int) -> range:
    """The requests whose latencies count: the first tenth (warm-up, queues filling from
    empty) and the last tenth (drain, no one arriving behind them) are left out."""
    return range(num_requests // 10, num_requests - num_requests // 10)


# -- the simulations ---------------------------------------------------------------------------


@dataclass(slots=True)
class PoolSim:
    """One simulated run of a pool: latency samples of the measured requests as (seconds,
    count), each worker's busy fraction on average, and the time-weighted batch size."""

    samples: list[tuple[float, int]]
    busy_frac: float
    mean_batch: float
    ttft_s: list[float] = field(default_factory=list)  # prefill: every request's, in order

    def percentile(self, pct: float) -> float:
        return percentile(self.samples, pct)


def percentile(samples: Sequence[tuple[float, int]], pct: float) -> float:
    """Nearest rank over (value, count) samples: the smallest value with at least pct% of the
    samples at or below it. No samples (no request makes a second token): 0."""
    ordered = sorted(samples)
    total = sum(c for _, c in ordered)
    if not total:
        return 0.0
    rank, seen = max(1, math.ceil(pct / 100 * total)), 0
    for value, count in ordered:
        seen += count
        if seen >= rank:
            return value
    return ordered[-1][0]


def simulate_prefill(
    workload: Workload, num_workers: int, profile: Profile, transfer_s_per_token: float = 0.0
) -> PoolSim:
    """The prefill pool; TTFT samples of the measured requests (see the module docstring)."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    arrivals, lens = workload.arrival_s, workload.prompt_lens
    budget, n = profile.max_num_batched_tokens, len(arrivals)
    ttft = [math.nan] * n
    queues: list[deque] = [deque() for _ in range(num_workers)]  # [request index, tokens left]
    queued = [0] * num_workers  # tokens not yet computed, the running step's included
    step_end = [math.inf] * num_workers
    takes: list[list[int]] = [[] for _ in range(num_workers)]  # the running step's per head
    busy = batch_time = 0.0

    def start_step(w: int, t: float) -> None:
        nonlocal busy, batch_time
        left, take = budget, []
        for entry in queues[w]:
            take.append(min(entry[1], left))
            left -= take[-1]
            if not left:
                break
        takes[w] = take
        step_s = profile.prefill_step(budget - left)
        step_end[w] = t + step_s
        busy += step_s
        batch_time += len(take) * step_s

    i, t_last = 0, 0.0
    while True:
        w = min(range(num_workers), key=step_end.__getitem__)
        t_arrival = arrivals[i] if i < n else math.inf
        if t_arrival == math.inf and step_end[w] == math.inf:
            break
        if t_arrival <= step_end[w]:
            k = min(range(num_workers), key=queued.__getitem__)
            queues[k].append([i, lens[i]])
            queued[k] += lens[i]
            if step_end[k] == math.inf:
                start_step(k, t_arrival)
            i += 1
            continue
        t = t_last = step_end[w]
        q = queues[w]
        for take in takes[w]:  # the step's requests are the queue's head, in order
            q[0][1] -= take
            queued[w] -= take
            if not q[0][1]:
                r = q.popleft()[0]
                ttft[r] = t - arrivals[r] + lens[r] * transfer_s_per_token
        step_end[w] = math.inf
        if q:
            start_step(w, t)
    span = num_workers * max(t_last, 1e-9)
    return PoolSim(
        [(ttft[r], 1) for r in measured(n)], busy / span, batch_time / busy if busy else 0.0, ttft
    )


def check_fits(workload: Workload, profile: Profile) -> str:
    """Why some request can never run on a decode worker ('' when every one can)."""
    longest = max(p + o for p, o in zip(workload.prompt_lens, workload.output_lens))
    if longest > profile.max_model_len:
        return f"a {longest}-token request exceeds max_model_len ({profile.max_model_len})"
    if math.ceil(longest / profile.block_size) > profile.num_blocks:
        return (
            f"a {longest}-token request needs more KV blocks than a worker has "
            f"({profile.num_blocks} of {profile.block_size} tokens)"
        )
    return ""


def simulate_decode(
    workload: Workload,
    num_workers: int,
    profile: Profile,
    ready_s: Sequence[float] | None = None,
) -> PoolSim:
    """The decode pool; ITL samples of the measured requests. `ready_s`: when each request's
    first token is out and it reaches decode (default: its arrival)."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if reason := check_fits(workload, profile):
        raise ValueError(reason)
    ready = workload.arrival_s if ready_s is None else ready_s
    prompts, outputs, bs = workload.prompt_lens, workload.output_lens, profile.block_size
    window = measured(len(ready))
    order = sorted((r for r in range(len(ready)) if outputs[r] > 1), key=ready.__getitem__)
    samples: list[tuple[float, int]] = []
    waiting: list[deque] = [deque() for _ in range(num_workers)]
    num_requests = [0] * num_workers  # waiting + running
    batch = [0] * num_workers
    ctx_sum = [0] * num_workers  # tokens of context over the batch
    free_blocks = [profile.num_blocks] * num_workers
    steps_done = [0] * num_workers
    finish_at: list[dict[int, list[int]]] = [{} for _ in range(num_workers)]
    joined: list[list[int]] = [[] for _ in range(num_workers)]  # new in the running step
    continuing = [0] * num_workers  # measured requests in the batch that are not new
    step_start = [0.0] * num_workers
    step_end = [math.inf] * num_workers
    busy = batch_time = 0.0

    def start_step(w: int, t: float) -> None:
        nonlocal busy, batch_time
        q = waiting[w]
        while q and batch[w] < profile.max_num_seqs:
            r = q[0]
            blocks = -(-(prompts[r] + outputs[r]) // bs)  # reserved for its whole length
            if blocks > free_blocks[w]:
                break
            q.popleft()
            free_blocks[w] -= blocks
            batch[w] += 1
            ctx_sum[w] += prompts[r] + 1
            finish_at[w].setdefault(steps_done[w] + outputs[r] - 2, []).append(r)
            joined[w].append(r)
        if not batch[w]:
            step_end[w] = math.inf
            return
        step_s = profile.decode_step(batch[w], ctx_sum[w] / batch[w])
        step_start[w], step_end[w] = t, t + step_s
        busy += step_s
        batch_time += batch[w] * step_s

    j, t_last = 0, 0.0
    while True:
        w = min(range(num_workers), key=step_end.__getitem__)
        t_arrival = ready[order[j]] if j < len(order) else math.inf
        if t_arrival == math.inf and step_end[w] == math.inf:
            break
        if t_arrival <= step_end[w]:
            k = min(range(num_workers), key=num_requests.__getitem__)
            waiting[k].append(order[j])
            num_requests[k] += 1
            if step_end[k] == math.inf:
                start_step(k, t_arrival)
            j += 1
            continue
        t = t_last = step_end[w]
        if continuing[w]:
            samples.append((t - step_start[w], continuing[w]))
        for r in joined[w]:
            if r in window:
                samples.append((t - ready[r], 1))
                continuing[w] += 1
        joined[w] = []
        ctx_sum[w] += batch[w]
        for r in finish_at[w].pop(steps_done[w], ()):
            batch[w] -= 1
            num_requests[w] -= 1
            ctx_sum[w] -= prompts[r] + outputs[r]
            free_blocks[w] += -(-(prompts[r] + outputs[r]) // bs)
            if r in window:
                continuing[w] -= 1
        steps_done[w] += 1
        start_step(w, t)
    span = num_workers * max(t_last, 1e-9)
    return PoolSim(samples, busy / span, batch_time / busy if busy else 0.0)


# -- the recommendation ------------------------------------------------------------------------


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
            f"{_fmt_s(worst)} > {_fmt_s(plan.slo_s)} (raise --max-replicas?)"
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
            f"even alone, p{slo.ttft_percentile:g} TTFT is {_fmt_s(lone_p)} ({what}) "
            f"> {_fmt_s(slo.ttft_s)}",
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
            f"a decode step at batch 1 takes {_fmt_s(step1)} (mean context {mean_ctx:.0f}) "
            f"> {_fmt_s(slo.itl_s)}",
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
    """Smallest prefill and decode pools meeting the SLOs for this load (see the module doc).
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


# -- the report --------------------------------------------------------------------------------


def _fmt_s(seconds: float) -> str:
    if not math.isfinite(seconds):
        return str(seconds)
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _pool_lines(pool: PoolPlan) -> list[str]:
    p = f"p{pool.percentile:g} {pool.metric}"
    unit = "prompt" if pool.role == "prefill" else f"output (batch {pool.best_batch})"
    lines = [
        f"{pool.role}: SLO {p} <= {_fmt_s(pool.slo_s)}; one worker does "
        f"{pool.capacity_per_worker:.0f} {unit} tok/s; utilisation bound: "
        f">= {pool.lower_bound} replica(s)"
    ]
    if pool.simulated:
        lines.append(f"  {'replicas':>8} {p:>12} {'busy':>6} {'batch':>7}")
        for n, s in pool.simulated.items():
            mark = "  <-" if n == pool.num_replicas else ""
            lines.append(
                f"  {n:>8} {_fmt_s(s['latency_s']):>12} {s['busy']:>6.0%} "
                f"{s['mean_batch']:>7.1f}{mark}"
            )
    if not pool.feasible:
        lines.append(f"  -> {pool.role}: infeasible: {pool.reason}")
        return lines
    n = pool.num_replicas
    at_n = _fmt_s(pool.simulated[n]["latency_s"])
    fewer = f"; with {n - 1}: {_fmt_s(pool.simulated[n - 1]['latency_s'])}" if n > 1 else ""
    lines.append(
        f"  -> {pool.role}: {n} replica{'s' * (n > 1)} ({p} {at_n} <= {_fmt_s(pool.slo_s)}{fewer})"
    )
    return lines


def format_plan(plan: Plan) -> str:
    load, fig = plan.load, plan.profile
    m = fig["machine"]
    lo_ctx, hi_ctx = fig["decode_contexts_measured"]
    lines = [
        f"load: {load['request_rate']:.2f} req/s; prompts {load['mean_prompt_len']:.0f} tokens "
        f"on average -> {load['prompt_tok_s']:.0f} prompt tok/s; outputs "
        f"{load['mean_output_len']:.0f} -> {load['output_tok_s']:.0f} output tok/s "
        f"({load['num_requests']} simulated requests)",
        f"profile: {m.get('device', '?')}, {m.get('dtype', '?')}, "
        f"{m.get('torch_threads', '?')} threads; prefill step {_fmt_s(fig['prefill_a_s'])} + "
        f"{fig['prefill_b_s_per_token'] * 1e3:.3f} ms/token -> "
        f"{fig['prefill_tokens_per_s']:.0f} tok/s at {fig['max_num_batched_tokens']} tokens; "
        f"decode step {_fmt_s(fig['decode_step_s_batch1'])} at batch 1 "
        f"(mean context {load['mean_decode_context']:.0f}; measured {lo_ctx}-{hi_ctx})",
    ]
    if not lo_ctx <= load["mean_decode_context"] <= hi_ctx:
        lines.append(
            "note: the mean decode context is outside the profile's context lengths; the "
            "nearest one stands in (profile longer contexts with --context-lens)"
        )
    if load["kv_transfer_s_per_prompt"]:
        lines.append(f"KV transfer: {_fmt_s(load['kv_transfer_s_per_prompt'])} per mean prompt")
    lines += _pool_lines(plan.prefill) + _pool_lines(plan.decode)
    if plan.feasible:
        lines.append(
            f"recommendation: {plan.prefill.num_replicas} prefill + "
            f"{plan.decode.num_replicas} decode workers"
        )
    else:
        lines.append("recommendation: none: the SLOs cannot be met (see above)")
    return "\n".join(lines)


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
