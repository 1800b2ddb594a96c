"""Event-by-event simulations of one pool of workers under a workload (the rules are in
the package docstring): the prefill pool gives TTFT samples, the decode pool ITL samples."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from tandem.planner.profile import Profile
from tandem.planner.workload import Workload, measured


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
    """The prefill pool; TTFT samples of the measured requests (see the package docstring)."""
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
