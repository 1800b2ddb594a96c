"""LoRA on the fused projections, for a batch that mixes adapters (S-LoRA / punica).

Every wrapped projection keeps, per adapter slot (--max-loras of them), one shrink matrix A
(R, in) and one expand matrix B (out, R): for a fused projection (q, k, v in qkv_proj; gate
and up in gate_up_proj) the shards' A matrices are stacked along R (max rank each) and B is
block-diagonal, so each shard's rows only see its own rank block; the scaling is folded into
B. A batch's tokens are grouped into segments of one slot (a request's tokens are
contiguous): y[segment] += (x[segment] A^T) B^T, base weights untouched, never a merged copy
per adapter. Decode rows are segments of one token (BGMV), prefill chunks longer ones
(SGMV). Three backends compute it: "triton" on CUDA (`kernels/triton_lora.py`), "cpu" where
the C++ CPU kernels build (`kernels/cpu_kernels.cpp`: rows grouped by slot, each slot's A and
B read once per four rows), "torch" elsewhere (every slot's products masked per row).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

BACKENDS = ("triton", "cpu", "torch")


def lora_backend(device: torch.device, use_triton: bool) -> str:
    """The kernels a runner on `device` uses (see the module's docstring)."""
    if use_triton:
        return "triton"
    if device.type == "cpu":
        from tandem.kernels.cpu import load_cpu_kernels

        if load_cpu_kernels():
            return "cpu"
    return "torch"


@dataclass(slots=True)
class LoRABatch:
    """The current forward's tokens by adapter slot: segments (start, end, slot) in row
    order, slot -1 for the base model, and what the backend takes, made once per step and
    shared by every layer: triton's per-segment arrays; the CPU kernel's slot per row; for
    torch's path, each row's slot one-hot (rows, slots) and, per rank width, its expansion
    (rows, slots x width)."""

    segments: list[tuple[int, int, int]]
    backend: str = "torch"
    onehot: torch.Tensor | None = None
    masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    # triton: (starts, lens, slots) int32 on the device, and the longest segment
    kernel_args: tuple | None = None
    row_slots: torch.Tensor | None = None  # cpu: (rows,) int64, -1 for the base model

    @classmethod
    def build(cls, segments: list[tuple[int, int, int]], device, backend: str,
              num_slots: int, dtype: torch.dtype = torch.float32) -> LoRABatch:  # fmt: skip
        merged: list[tuple[int, int, int]] = []
        for start, end, slot in segments:
            if merged and merged[-1][2] == slot and merged[-1][1] == start:
                merged[-1] = (merged[-1][0], end, slot)
            elif end > start:
                merged.append((start, end, slot))
        assert backend in BACKENDS, backend
        batch = cls(merged, backend)
        adapted = [s for s in merged if s[2] >= 0]
        if not adapted:
            return batch
        if backend == "triton":
            columns = ([s[0] for s in adapted], [s[1] - s[0] for s in adapted],
                       [s[2] for s in adapted])  # fmt: skip
            tensors = [torch.tensor(c, dtype=torch.int32, device=device) for c in columns]
            batch.kernel_args = (*tensors, max(columns[1]))
            return batch
        rows = max(end for _, end, _ in merged)
        slot_of = torch.full((rows,), -1, dtype=torch.int64)
        for start, end, slot in adapted:
            slot_of[start:end] = slot
        if backend == "cpu":
            batch.row_slots = slot_of
            return batch
        onehot = (slot_of.unsqueeze(1) == torch.arange(num_slots)).to(dtype)
        batch.onehot = onehot.to(device)
        return batch

    @property
    def active(self) -> bool:
        return (self.onehot is not None or self.kernel_args is not None
                or self.row_slots is not None)  # fmt: skip

    def mask(self, shards: int, rank: int) -> torch.Tensor:
        """(rows, shards x slots x rank): 1 where the column is in the row's own slot's
        block (columns shard-major, then slot, then rank)."""
        mask = self.masks.get((shards, rank))
        if mask is None:
            per_shard = self.onehot.repeat_interleave(rank, dim=1)
            mask = self.masks[(shards, rank)] = per_shard.repeat(1, shards)
        return mask


class LoRALinear(nn.Module):
    """A projection with per-slot LoRA deltas added to its output.

    The kernels' layout is per slot A (R, in) and B (out, R); the CPU kernel's B is stored
    transposed, (R, out) (`lora_b` is then a view of it). `backend` must be the one of the
    batches it is given. Torch's path multiplies every row by every slot's A at once, x
    (rows, in) @ A_all (in, shards x slots x rank), keeps each row's own slot's columns (the
    step's mask), and expands shard by shard, t_shard (rows, slots x rank) @ B_shard (slots x
    rank, out_shard) into the shard's columns of the output: a few operations per projection
    whatever the mix of adapters; the products are slots x rank wide."""

    def __init__(self, base: nn.Module, shard_sizes: list[int], in_features: int,
                 max_loras: int, max_rank: int, dtype: torch.dtype, device: torch.device,
                 backend: str = "torch") -> None:  # fmt: skip
        super().__init__()
        self.base = base
        self.shard_sizes = shard_sizes
        self.max_rank = max_rank
        self.backend = backend
        rank = len(shard_sizes) * max_rank
        out = sum(shard_sizes)
        self.lora_a = torch.zeros(max_loras, rank, in_features, dtype=dtype, device=device)
        if backend == "cpu":
            self.lora_bt = torch.zeros(max_loras, rank, out, dtype=dtype, device=device)
            self.lora_b = self.lora_bt.transpose(1, 2)
        else:
            self.lora_b = torch.zeros(max_loras, out, rank, dtype=dtype, device=device)
        self.a_all = self.b_shards = None
        if backend == "torch":
            # every slot side by side: A_all (in, shards x slots x rank) and per shard
            # B (slots x rank, out_shard)
            width = max_loras * max_rank
            self.a_all = torch.zeros(in_features, len(shard_sizes) * width, dtype=dtype,
                                     device=device)  # fmt: skip
            self.b_shards = [torch.zeros(width, size, dtype=dtype, device=device)
                             for size in shard_sizes]  # fmt: skip
        self.batch: LoRABatch | None = None

    def set_slot(self, slot: int, shards: list[tuple[torch.Tensor, torch.Tensor] | None]):
        """Write one adapter's shards (A (r, in), B (out_i, r) scaled; None: not targeted)
        into `slot`, zeros elsewhere."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        row, r = 0, self.max_rank
        width = self.lora_a.shape[0] * r
        for i, (size, pair) in enumerate(zip(self.shard_sizes, shards)):
            ranks = slice(i * r, (i + 1) * r)
            if pair is not None:
                a, b = pair
                self.lora_a[slot, i * r : i * r + a.shape[0]].copy_(a)
                self.lora_b[slot, row : row + size, i * r : i * r + b.shape[1]].copy_(b)
            if self.a_all is not None:
                cols = slice(i * width + slot * r, i * width + (slot + 1) * r)
                self.a_all[:, cols].copy_(self.lora_a[slot, ranks].t())
                self.b_shards[i][slot * r : (slot + 1) * r].copy_(
                    self.lora_b[slot, row : row + size, ranks].t()
                )
            row += size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self.batch
        if batch is None or not batch.active:
            return y
        assert batch.backend == self.backend, (batch.backend, self.backend)
        if batch.kernel_args is not None:
            from tandem.kernels.triton_lora import lora_shrink_expand

            lora_shrink_expand(x, self.lora_a, self.lora_b, y, *batch.kernel_args)
            return y
        if batch.row_slots is not None:
            from tandem.kernels import cpu

            y = y.contiguous()
            cpu.lora_shrink_expand(y, x.contiguous(), self.lora_a, self.lora_bt,
                                   batch.row_slots, self.shard_sizes)  # fmt: skip
            return y
        shards = len(self.shard_sizes)
        t = torch.matmul(x, self.a_all).mul_(batch.mask(shards, self.max_rank))
        if shards == 1:
            return y.add_(torch.matmul(t, self.b_shards[0]))
        width = t.shape[1] // shards
        row = 0
        for i, (size, b) in enumerate(zip(self.shard_sizes, self.b_shards)):
            y[:, row : row + size] += torch.matmul(t[:, i * width : (i + 1) * width], b)
            row += size
        return y
