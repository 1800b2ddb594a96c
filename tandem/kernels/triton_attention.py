"""Triton kernels of the GPU path: paged attention over the KV cache, and the KV store.

`unified_attention` serves prefill chunks and decodes in one launch, as vLLM's
`triton_unified_attention`: each program takes a tile of one sequence's query tokens times
the query heads that share one KV head (GQA packed into the rows of one matrix), walks the
sequence's keys through its block table in tiles, and keeps an online softmax in fp32. A
query token at position p (its sequence's cached prefix and earlier chunks come first) sees
keys [0, p]: prefill over a cached prefix, chunked prefill and decode are the same rule.

A batch of decodes only (a decode worker's usual step) also splits each sequence's keys
into segments that run as programs of their own (flash-decoding): at batch 64 there are
too few (sequence, KV head) pairs to fill a GPU, and one program walking 2,048 keys alone
leaves memory bandwidth idle. A second kernel merges the segments' partial softmaxes.

`reshape_and_cache` writes a step's keys and values into their cache slots (vLLM's name).

The cache is the one `attention.py` describes: (num_blocks, num_kv_heads, block_size,
head_dim) per layer for K and V. Each kernel has a plain-torch reference in
`kernels/reference.py`; the tests run both under `TRITON_INTERPRET=1` on the CPU, and for
real on a GPU (`scripts/gpu_check.sh`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _unified_attention(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,  # q, out: (T, H, D); caches (NB, Hkv, BS, D)
    m_ptr, l_ptr, acc_ptr,  # a decode split's partials: (T, H, S), (T, H, S), (T, H, S, D)
    block_tables_ptr, seq_lens_ptr, query_start_ptr,
    scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_ch, stride_cs,
    stride_bt,
    NUM_HEADS: tl.constexpr,
    NUM_QUERIES_PER_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per KV cache block
    TILE_N: tl.constexpr,  # keys per iteration
    BLOCK_Q: tl.constexpr,  # query tokens per program
    BLOCK_G: tl.constexpr,  # NUM_QUERIES_PER_KV rounded up to a power of two
    NUM_SEGMENTS: tl.constexpr,  # > 1: write partials for `_merge_segments`
    IEEE: tl.constexpr,  # fp32: exact products (no TF32)
):  # fmt: skip
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2) // NUM_SEGMENTS
    segment = tl.program_id(2) % NUM_SEGMENTS
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len  # position of the sequence's first query token

    BLOCK_M: tl.constexpr = BLOCK_Q * BLOCK_G
    rows = tl.arange(0, BLOCK_M)
    qi = q_tile * BLOCK_Q + rows // BLOCK_G  # query token within the sequence
    g = rows % BLOCK_G
    head = kv_head * NUM_QUERIES_PER_KV + g
    row_ok = (qi < q_len) & (g < NUM_QUERIES_PER_KV)
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_DIM
    q_rows = (q_start + qi).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    q_pos = first_pos + qi
    last_pos = first_pos + tl.minimum(q_tile * BLOCK_Q + BLOCK_Q, q_len) - 1
    num_keys = last_pos + 1  # the keys any row of this tile may see
    # This program's share of the keys: all of them, or one segment of a decode split.
    per_segment = tl.cdiv(tl.cdiv(num_keys, NUM_SEGMENTS), TILE_N) * TILE_N
    k_begin = segment * per_segment
    k_end = tl.minimum(num_keys, k_begin + per_segment)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    n = tl.arange(0, TILE_N)
    for start in range(k_begin, k_end, TILE_N):
        k_pos = start + n
        k_ok = k_pos < k_end
        table = block_tables_ptr + seq * stride_bt
        block = tl.load(table + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        slot = block * stride_cb + kv_head * stride_ch + (k_pos % BLOCK_SIZE) * stride_cs
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + slot[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + slot[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :] & row_ok[:, None]
        s = tl.where(visible, s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if NUM_SEGMENTS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
    else:
        part = (q_rows * NUM_HEADS + head) * NUM_SEGMENTS + segment  # into (T, H, S)
        tl.store(m_ptr + part, m_i, mask=row_ok)
        tl.store(l_ptr + part, l_i, mask=row_ok)
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc,
                 mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip


@triton.jit
def _merge_segments(
    out_ptr, m_ptr, l_ptr, acc_ptr,
    stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
    SEG_PAD: tl.constexpr,
):  # fmt: skip
    """One (token, head): the segments' partial softmaxes merged into the output."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, SEG_PAD)
    s_ok = s < NUM_SEGMENTS
    base = (t * NUM_HEADS + h) * NUM_SEGMENTS
    m = tl.load(m_ptr + base + s, mask=s_ok, other=float("-inf"))
    l = tl.load(l_ptr + base + s, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(s_ok & (m > float("-inf")), tl.exp(m - m_max), 0.0)
    total = tl.sum(l * w, 0)
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_DIM
    acc = tl.load(acc_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :],
                  mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    out = tl.sum(acc * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d_ok)  # fmt: skip


@triton.jit
def _reshape_and_cache(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ch, stride_cs,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # a padded row (a captured batch larger than the real one)
        return
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_DIM
    dest = (slot // BLOCK_SIZE) * stride_cb + h * stride_ch + (slot % BLOCK_SIZE) * stride_cs + d
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=d_ok)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=d_ok)
    tl.store(k_cache_ptr + dest, k.to(k_cache_ptr.dtype.element_ty), mask=d_ok)
    tl.store(v_cache_ptr + dest, v.to(v_cache_ptr.dtype.element_ty), mask=d_ok)


def reshape_and_cache(
    k: torch.Tensor,  # (T, Hkv, D)
    v: torch.Tensor,
    k_cache: torch.Tensor,  # (num_blocks, Hkv, block_size, D)
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # (T,) int64; < 0: skip the row
) -> None:
    """Each token's K and V into its cache slot (`block * block_size + offset`)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _check_cache(k_cache, v_cache)
    _reshape_and_cache[(num_tokens, num_kv_heads)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[2], HEAD_DIM=head_dim, HEAD_PAD=_head_pad(head_dim),
    )  # fmt: skip


def unified_attention(
    q: torch.Tensor,  # (T, H, D)
    k_cache: torch.Tensor,  # (num_blocks, Hkv, block_size, D)
    v_cache: torch.Tensor,
    out: torch.Tensor,  # (T, H, D)
    query_start_loc: torch.Tensor,  # (num_seqs + 1,) int32: each sequence's first row
    seq_lens: torch.Tensor,  # (num_seqs,) int32: keys per sequence, this step's included
    block_tables: torch.Tensor,  # (num_seqs, max_blocks) int32
    max_query_len: int,
    scale: float,
    num_segments: int | None = None,
) -> torch.Tensor:
    """Causal paged attention of every sequence's query rows over its cached keys. With
    `num_segments` (decode-only batches; chosen here when None) the keys are split across
    programs and merged after."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    _, num_kv_heads, block_size, _ = k_cache.shape
    if num_tokens == 0:
        return out
    _check_cache(k_cache, v_cache)
    assert q.stride(2) == 1 and out.stride(2) == 1
    group = num_heads // num_kv_heads
    block_g = triton.next_power_of_2(group)
    if max_query_len > 1:
        block_m = 64 if max_query_len >= 64 else 16
    else:
        block_m = 16  # tl.dot's least M on GPUs
    block_q = max(block_m // block_g, 1)
    tile_n = max(32, block_size)
    if num_segments is None:
        num_segments = _segments(num_seqs * num_kv_heads, max_query_len, q.device)
    if max_query_len > 1:
        num_segments = 1  # the split is for decode-only batches
    parts = (None, None, None)
    if num_segments > 1:
        shape = (num_tokens, num_heads, num_segments)
        f32 = dict(dtype=torch.float32, device=q.device)
        parts = (torch.empty(shape, **f32), torch.empty(shape, **f32),
                 torch.empty(*shape, head_dim, **f32))  # fmt: skip
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads * num_segments)
    _unified_attention[grid](
        q, k_cache, v_cache, out, *(p if p is not None else out for p in parts),
        block_tables, seq_lens, query_start_loc, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        NUM_HEADS=num_heads, NUM_QUERIES_PER_KV=group, HEAD_DIM=head_dim,
        HEAD_PAD=_head_pad(head_dim), BLOCK_SIZE=block_size, TILE_N=tile_n, BLOCK_Q=block_q,
        BLOCK_G=block_g, NUM_SEGMENTS=num_segments, IEEE=q.dtype == torch.float32,
    )  # fmt: skip
    if num_segments > 1:
        _merge_segments[(num_tokens, num_heads)](
            out, *parts, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, HEAD_PAD=_head_pad(head_dim),
            NUM_SEGMENTS=num_segments, SEG_PAD=triton.next_power_of_2(num_segments),
        )  # fmt: skip
    return out


def _segments(num_programs: int, max_query_len: int, device: torch.device) -> int:
    """How many key segments per decode sequence: enough programs for about four per
    streaming multiprocessor (one on the CPU's interpreter), at most 16."""
    if max_query_len > 1 or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(16, (4 * sms) // max(num_programs, 1)))


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.stride(3) == 1


def _head_pad(head_dim: int) -> int:
    """The head dimension as a power of two, at least tl.dot's least K (16)."""
    return max(16, triton.next_power_of_2(head_dim))
