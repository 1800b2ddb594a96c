"""LoRA on the fused projections, for a batch that mixes adapters (S-LoRA / punica).

Every wrapped projection keeps, per adapter slot (--max-loras of them), one shrink matrix A
(R, in) and one expand matrix B (out, R): for a fused projection (q, k, v in qkv_proj; gate
and up in gate_up_proj) the shards' A matrices are stacked along R (max rank each) and B is
block-diagonal, so each shard's rows only see its own rank block; the scaling is folded into
B. A batch's tokens are grouped into segments of one slot (a request's tokens are
contiguous): y[segment] += (x[segment] A^T) B^T, base weights untouched, never a merged copy
per adapter. Decode rows are segments of one token (BGMV), prefill chunks longer ones
(SGMV). On CUDA both products are the triton kernels of `kernels/triton_lora.py`; elsewhere
torch's matmuls, one pair per slot present in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(slots=True)
class LoRABatch:
    """The current forward's tokens by adapter slot: segments (start, end, slot) in row
    order, slot -1 for the base model; and per slot present, its rows."""

    segments: list[tuple[int, int, int]]
    rows: dict[int, torch.Tensor | slice] = field(default_factory=dict)
    # triton: (starts, lens, slots) int32 on the device, and the longest segment
    kernel_args: tuple | None = None

    @classmethod
    def build(cls, segments: list[tuple[int, int, int]], device, use_kernel: bool) -> LoRABatch:
        merged: list[tuple[int, int, int]] = []
        for start, end, slot in segments:
            if merged and merged[-1][2] == slot and merged[-1][1] == start:
                merged[-1] = (merged[-1][0], end, slot)
            elif end > start:
                merged.append((start, end, slot))
        batch = cls(merged)
        adapted = [s for s in merged if s[2] >= 0]
        if use_kernel and adapted:
            columns = ([s[0] for s in adapted], [s[1] - s[0] for s in adapted],
                       [s[2] for s in adapted])  # fmt: skip
            tensors = [torch.tensor(c, dtype=torch.int32, device=device) for c in columns]
            batch.kernel_args = (*tensors, max(columns[1]))
            return batch
        by_slot: dict[int, list[tuple[int, int]]] = {}
        for start, end, slot in adapted:
            by_slot.setdefault(slot, []).append((start, end))
        for slot, spans in by_slot.items():
            if len(spans) == 1:
                batch.rows[slot] = slice(*spans[0])
            else:
                index = torch.cat([torch.arange(s, e) for s, e in spans])
                batch.rows[slot] = index.to(device)
        return batch

    @property
    def active(self) -> bool:
        return bool(self.rows) or self.kernel_args is not None


class LoRALinear(nn.Module):
    """A projection with per-slot LoRA deltas added to its output."""

    def __init__(self, base: nn.Module, shard_sizes: list[int], in_features: int,
                 max_loras: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:  # fmt: skip
        super().__init__()
        self.base = base
        self.shard_sizes = shard_sizes
        self.max_rank = max_rank
        rank = len(shard_sizes) * max_rank
        out = sum(shard_sizes)
        self.lora_a = torch.zeros(max_loras, rank, in_features, dtype=dtype, device=device)
        self.lora_b = torch.zeros(max_loras, out, rank, dtype=dtype, device=device)
        self.batch: LoRABatch | None = None

    def set_slot(self, slot: int, shards: list[tuple[torch.Tensor, torch.Tensor] | None]):
        """Write one adapter's shards (A (r, in), B (out_i, r) scaled; None: not targeted)
        into `slot`, zeros elsewhere."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        row = 0
        for i, (size, pair) in enumerate(zip(self.shard_sizes, shards)):
            if pair is not None:
                a, b = pair
                r0 = i * self.max_rank
                self.lora_a[slot, r0 : r0 + a.shape[0]].copy_(a)
                self.lora_b[slot, row : row + size, r0 : r0 + b.shape[1]].copy_(b)
            row += size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self.batch
        if batch is None or not batch.active:
            return y
        if batch.kernel_args is not None:
            from tandem.kernels.triton_lora import lora_shrink_expand

            lora_shrink_expand(x, self.lora_a, self.lora_b, y, *batch.kernel_args)
            return y
        for slot, rows in batch.rows.items():
            delta = (x[rows] @ self.lora_a[slot].t()) @ self.lora_b[slot].t()
            if isinstance(rows, slice):
                y[rows] += delta
            else:
                y.index_add_(0, rows, delta)
        return y
