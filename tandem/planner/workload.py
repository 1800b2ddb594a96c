"""The load to plan for: Poisson arrivals with prompt and output lengths drawn from a
distribution, and the window of requests whose latencies count."""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass


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
