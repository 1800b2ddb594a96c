"""Layers shared by the model families, with where and how each runs fastest: the linear
layer's CPU weight layouts, RMSNorm's C++ kernel on CPUs, RoPE's tables and rotation."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tandem.kernels import cpu as cpu_kernels
from tandem.kernels.cpu import LINEAR_MAX_ROWS, load_cpu_kernels

logger = logging.getLogger(__name__)

# The row counts at which a weight shape's packed product is timed against the plain one
# (ascending): one-token decode, decode batches, a prefill chunk. The packed form then runs
# from the fewest of them where it wins at every larger one.
CALIBRATION_ROWS = (1, 2, 4, 8, 16, 32, 128)

# Packed counts as winning up to this much slower: where the two run alike (bf16 at 128 rows),
# one noisy timing would otherwise drop the packed form at every row count below it.
PACKED_TIE = 1.05

# The dtypes whose weights are also kept in oneDNN's packed layout (then measured).
PACKED_DTYPES = (torch.float32, torch.bfloat16)
# The dtypes whose products at up to LINEAR_MAX_ROWS rows run in the C++ kernel.
ROWS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Linear(nn.Module):
    """y = x W^T + b, loaded as (out, in) like nn.Linear.

    After loading, `prepare()` stores the weight transposed, (in, out) and contiguous, on
    CPUs: MKL's GEMM runs x @ W_t faster than F.linear's transposed operand at decode batch
    sizes. GPUs keep the checkpoint layout (cuBLAS does not care). A weight shared with
    another module (an lm_head tied to the embeddings) gets its transposed copy too, at the
    cost of that copy's memory: the embedding keeps the original.

    In fp32 and bf16 with oneDNN it also keeps the weight in oneDNN's packed layout: MKL's
    GEMM at decode's few rows is far from its large-M rate, and oneDNN's packed product is
    not. From how many rows it runs is measured at load (`calibrate_packed`), per weight
    shape.

    Below that, at one to LINEAR_MAX_ROWS rows (decode at low concurrency), the C++ kernel
    `linear_rows` reads the weight as loaded, (out, in), split over all of torch's threads:
    MKL's and oneDNN's one-row products stay on one core however many threads they are
    given, so a decode worker lent a second core would not use it. It costs a second copy of
    the weight (the checkpoint layout; an lm_head tied to the embeddings shares it).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.weight_t: torch.Tensor | None = None
        self.packed: torch.Tensor | None = None  # oneDNN's layout, opaque
        self.packed_from = 2  # fewest rows that go through the packed form
        self.weight_rows: torch.Tensor | None = None  # (out, in), for linear_rows

    def prepare(self) -> None:
        if self.weight is None or self.weight.device.type != "cpu":
            return
        weight = self.weight.detach()
        self.weight_t = weight.t().contiguous()
        if weight.dtype in ROWS_DTYPES and weight.is_contiguous() and load_cpu_kernels():
            self.weight_rows = weight
        if weight.dtype in PACKED_DTYPES and torch.backends.mkldnn.is_available():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            except RuntimeError as e:  # a CPU oneDNN has no bf16 product for
                logger.debug("no packed %s product: %s", weight.dtype, e)
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_t is None:
            return F.linear(x, self.weight, self.bias)
        if self.weight_rows is not None and x.dim() == 2 and x.shape[0] <= LINEAR_MAX_ROWS:
            return cpu_kernels.linear_rows(x, self.weight_rows, self.bias)
        if self.packed is not None and x.shape[0] >= self.packed_from and x.dim() == 2:
            return in_row_buckets(self.forward_packed, x)
        if x.dtype == torch.bfloat16 and x.dim() == 2:  # oneDNN's product too
            return in_row_buckets(self.forward_plain, x)
        return self.forward_plain(x)

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.matmul(x, self.weight_t)
        return torch.addmm(self.bias, x, self.weight_t)

    def forward_packed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


EXACT_ROWS = 64  # products of up to this many rows run as they are
FINE_ROWS = 512  # above EXACT_ROWS and up to this many, rows round up to a multiple of 16
COARSE_STEP = 64  # above FINE_ROWS, to a multiple of 64


def bucket_rows(rows: int) -> int:
    """The row count a product of `rows` rows runs on (see `in_row_buckets`)."""
    if rows <= EXACT_ROWS:
        return rows
    step = 16 if rows <= FINE_ROWS else COARSE_STEP
    return -(-rows // step) * step


def in_row_buckets(product: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
    """`product(x)` with x's rows padded (zeros) up to `bucket_rows`: each row's result is
    its own, the padding's is dropped.

    oneDNN compiles and caches a kernel for every row count it meets (its primitive cache and
    ideep's, 1,024 each). A prefill worker's steps have nearly every count up to the token
    budget: the caches grew without bound in use, then fragmented the heap as they evicted
    (docs/robustness.md, memory). With buckets a weight shape meets at most 116 counts up to
    2,048 rows (and 16 more per 1,024 beyond), which the caches hold for good; the padding
    costs at most 15 rows up to 512, 63 beyond (under 12%)."""
    rows = x.shape[0]
    padded = bucket_rows(rows)
    if padded == rows:
        return product(x)
    return product(F.pad(x, (0, 0, 0, padded - rows)))[:rows]


def _best_of(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def calibrate_packed(
    linears: Iterable[Linear],
    timer: Callable[[Linear, torch.Tensor, bool], float] | None = None,
    repeats: int = 3,
) -> dict[tuple[int, int], int | None]:
    """Measure, on this machine and at the calling thread's torch thread count, from how many
    rows each weight shape's packed product beats its plain one at every larger row count of
    CALIBRATION_ROWS, and set `packed_from` to it; where it never does, drop the packed copy
    (its memory too). One module per shape is timed (best of `repeats`).
    `timer(module, x, packed)` -> seconds replaces the clock in tests. Returns, per (in, out)
    shape, the row count the packed form starts at (None: not used)."""
    if timer is None:

        def timer(module: Linear, x: torch.Tensor, packed: bool) -> float:
            run = module.forward_packed if packed else module.forward_plain
            run(x)  # warm: first touch of the weights
            return _best_of(lambda: run(x), repeats)

    by_shape: dict[tuple[int, int], list[Linear]] = {}
    for module in linears:
        if module.packed is not None:
            by_shape.setdefault(tuple(module.weight_t.shape), []).append(module)
    chosen: dict[tuple[int, int], int | None] = {}
    with torch.inference_mode():
        for shape, modules in by_shape.items():
            start = None  # the fewest rows from which packed wins at every larger count
            for rows in reversed(CALIBRATION_ROWS):
                x = torch.randn(rows, shape[0], dtype=modules[0].weight_t.dtype)
                if timer(modules[0], x, True) > PACKED_TIE * timer(modules[0], x, False):
                    break
                start = rows
            chosen[shape] = start
            for module in modules:
                if start is None:
                    module.packed = None
                else:
                    module.packed_from = start
    logger.info("packed products (oneDNN) from rows, per weight shape: %s", chosen)
    return chosen


class RMSNorm(nn.Module):
    """weight * x / rms(x) over the last dim, computed in fp32 as Hugging Face's LlamaRMSNorm.

    On CPUs with the C++ kernels built it runs in one pass over each row (torch's path runs
    several kernels); elsewhere, torch's F.rms_norm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and load_cpu_kernels():
            return cpu_kernels.rms_norm(x.contiguous(), self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # fp32 inside

    def add_and_norm(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual += x in place; returns the sum normalized."""
        if x.device.type == "cpu" and load_cpu_kernels():
            return cpu_kernels.add_rms_norm(residual, x.contiguous(), self.weight, self.eps)
        return self(residual.add_(x))


def rope_cos_sin(
    head_dim: int, theta: float, scaling: dict | None, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_len, head_dim) cos and signed sin tables in fp32, HF's half-rotation layout.

    The sin table is stored signed, (-sin, sin) by halves of the last dim: what apply_rope
    multiplies by. `scaling`: None, or a config's rope_scaling with its `rope_type`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is not None:
        if scaling["rope_type"] == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif scaling["rope_type"] == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        else:
            raise ValueError(f"unsupported rope_type {scaling['rope_type']!r}")
    t = torch.arange(max_len, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)  # (max_len, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (max_len, head_dim)
    sin = emb.sin()
    half = head_dim // 2
    return emb.cos(), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: (T, heads, D); cos/signed_sin: (T, 1, D), signed_sin = (-sin, sin) by halves.

    HF's x * cos + rotate_half(x) * sin with the same roundings, in two temporaries, not
    five: rotate_half(x) * sin = (x2, x1) * (-sin, sin) (negating is exact)."""
    half = x.shape[-1] // 2
    out = x * cos
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)  # (T, heads, D)
    return out.add_(swapped.mul_(signed_sin))
