"""One worker's measured capacity, as `tandem bench profile` writes it, and the step times
read off it: a prefill step is linear in its tokens, a decode step is read from the table of
(context length, batch size) -> seconds."""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from dataclasses import dataclass, field


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
