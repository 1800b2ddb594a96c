"""Layers shared by the model families."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# MKL's packed GEMM runs at the row count it was packed for and only there (any other count
# falls back to the plain GEMM): decode batches of 17-32 rows are padded to it.
PACKED_ROWS = 32


class Linear(nn.Module):
    """y = x W^T + b, loaded as (out, in) like nn.Linear.

    After loading, `prepare()` stores the weight transposed, (in, out) and contiguous, on
    CPUs: MKL's GEMM runs x @ W_t about 10% faster than F.linear's transposed operand at
    decode batch sizes. GPUs keep the checkpoint layout (cuBLAS does not care). A weight
    shared with another module (an lm_head tied to the embeddings) gets its transposed copy
    too: the embedding keeps the original (SmolLM2: +108 MiB in fp32; its logits at batch
    32 take 35-40% less time than through F.linear).

    In fp32 with MKL it also keeps the weight packed for 32-row products: MKL's small-M
    GEMM is far from its large-M rate, and its packed form takes SmolLM2's linear layers at
    32 rows from ~130 ms to ~90 ms (a 16-row batch padded to 32 costs what 16 rows do
    unpacked, so padding starts above 16).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.weight_t: torch.Tensor | None = None
        self.packed: torch.Tensor | None = None

    def prepare(self) -> None:
        if self.weight is None or self.weight.device.type != "cpu":
            return
        weight = self.weight.detach()
        self.weight_t = weight.t().contiguous()
        if weight.dtype == torch.float32 and torch.backends.mkl.is_available():
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, PACKED_ROWS)
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_t is None:
            return F.linear(x, self.weight, self.bias)
        rows = x.shape[0]
        if self.packed is not None and PACKED_ROWS // 2 < rows <= PACKED_ROWS and x.dim() == 2:
            padded = F.pad(x, (0, 0, 0, PACKED_ROWS - rows)) if rows < PACKED_ROWS else x
            y = torch.ops.mkl._mkl_linear(
                padded, self.packed, self.weight_t.t(), self.bias, PACKED_ROWS
            )
            return y[:rows]
        if self.bias is None:
            return torch.matmul(x, self.weight_t)
        return torch.addmm(self.bias, x, self.weight_t)
