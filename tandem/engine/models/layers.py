"""Layers shared by the model families."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

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


class Linear(nn.Module):
    """y = x W^T + b, loaded as (out, in) like nn.Linear.

    After loading, `prepare()` stores the weight transposed, (in, out) and contiguous, on
    CPUs: MKL's GEMM runs x @ W_t about 10% faster than F.linear's transposed operand at
    decode batch sizes. GPUs keep the checkpoint layout (cuBLAS does not care). A weight
    shared with another module (an lm_head tied to the embeddings) gets its transposed copy
    too: the embedding keeps the original (SmolLM2: +108 MiB in fp32; its logits at batch
    32 take 35-40% less time than through F.linear).

    In fp32 and bf16 with oneDNN it also keeps the weight in oneDNN's packed layout: MKL's
    GEMM at decode's few rows is far from its large-M rate, and oneDNN's packed product is
    not (SmolLM2's linear layers, one thread, x @ W_t against packed: fp32 16 rows 103 -> 53
    ms, 32 rows 158 -> 94, a 2,048-token prefill 5.9 -> 5.2 s, one row 31 -> 36; bf16 on a
    CPU with AVX-512 BF16, 1 row 36 -> 19 ms, 16 rows 55 -> 29). From how many rows it runs
    is measured at load (`calibrate_packed`), per weight shape.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.weight_t: torch.Tensor | None = None
        self.packed: torch.Tensor | None = None  # oneDNN's layout, opaque
        self.packed_from = 2  # fewest rows that go through the packed form

    def prepare(self) -> None:
        if self.weight is None or self.weight.device.type != "cpu":
            return
        weight = self.weight.detach()
        self.weight_t = weight.t().contiguous()
        if weight.dtype in PACKED_DTYPES and torch.backends.mkldnn.is_available():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            except RuntimeError as e:  # a CPU oneDNN has no bf16 product for
                logger.debug("no packed %s product: %s", weight.dtype, e)
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_t is None:
            return F.linear(x, self.weight, self.bias)
        if self.packed is not None and x.shape[0] >= self.packed_from and x.dim() == 2:
            return self.forward_packed(x)
        return self.forward_plain(x)

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.matmul(x, self.weight_t)
        return torch.addmm(self.bias, x, self.weight_t)

    def forward_packed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


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
