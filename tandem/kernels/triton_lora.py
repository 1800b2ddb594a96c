"""Triton kernels of multi-LoRA (the punica approach, as vLLM's SGMV/BGMV): a batch's rows
come in segments that share one adapter slot, and each program multiplies one tile of one
segment's rows by that slot's matrix. Decode rows are segments of one row (BGMV); prefill
chunks, long segments (SGMV). Two launches per projection:

- shrink: t[rows] = x[rows] @ A[slot]^T, A (slots, R, in): R is small (ranks, stacked);
- expand: y[rows] += t[rows] @ B[slot]^T, B (slots, out, R).

t is fp32; products accumulate in fp32 (fp32 operands exactly: `input_precision="ieee"`).
The plain-torch reference is LoRALinear's own CPU path (`engine/lora/layers.py`); the tests
run both under `TRITON_INTERPRET=1` on the CPU and for real on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _segment_matmul(
    x_ptr, w_ptr, out_ptr,  # x (T, K), w (slots, N, K), out (T, N)
    starts_ptr, lens_ptr, slots_ptr,  # per segment
    N, K,
    stride_xm, stride_xk, stride_ws, stride_wn, stride_wk, stride_om, stride_on,
    ACCUMULATE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    seg = tl.program_id(0)
    start = tl.load(starts_ptr + seg)
    length = tl.load(lens_ptr + seg)
    slot = tl.load(slots_ptr + seg).to(tl.int64)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < length  # a tile past its segment's end does nothing
    mask_n = rn < N
    rows = (start + rm).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
        w = tl.load(w_ptr + slot * stride_ws + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # fmt: skip
        if IEEE:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x.to(w.dtype), w)
    offsets = rows[:, None] * stride_om + rn[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


def segment_matmul(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, starts: torch.Tensor,
                   lens: torch.Tensor, slots: torch.Tensor, max_len: int,
                   accumulate: bool) -> None:  # fmt: skip
    """out[segment rows] (+)= x[segment rows] @ w[segment slot]^T, for every segment."""
    n, k = w.shape[1], w.shape[2]
    block_m, block_n, block_k = 16, 64, 32
    grid = (starts.numel(), triton.cdiv(max_len, block_m), triton.cdiv(n, block_n))
    _segment_matmul[grid](
        x, w, out, starts, lens, slots, n, k,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
        out.stride(0), out.stride(1),
        ACCUMULATE=accumulate, IEEE=w.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip


def lora_shrink_expand(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       y: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor,
                       slots: torch.Tensor, max_len: int) -> None:  # fmt: skip
    """y[rows of each segment] += (x[rows] @ A[slot]^T) @ B[slot]^T, in place."""
    t = torch.empty(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    segment_matmul(x, lora_a, t, starts, lens, slots, max_len, accumulate=False)
    segment_matmul(t, lora_b, y, starts, lens, slots, max_len, accumulate=True)
