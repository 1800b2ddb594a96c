"""Paged attention on top of torch: KV lives in fixed-size blocks, read through block tables.

The batch is flat (all requests' tokens concatenated, decodes first). Decodes (one query
token each) share one batched call over their gathered blocks; each prefill chunk gets its
own call, causal over its cached prefix plus itself. Only the blocks a request owns are
read: never a copy of the whole cache. Metadata is built once per step, not per layer.

On CUDA the triton kernels (`kernels/triton_attention.py`) take over: one launch stores the
step's K and V, one attends for the whole batch, decodes and prefill chunks alike, straight
off the block tables (no gathered copy of any context).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tandem.engine.kv_quant import as_bytes, dequantize, is_fp8, quantize
from tandem.kernels.cpu import (
    decode_attention_rope,
    has_prefill_attention_bf16,
    load_cpu_kernels,
    paged_decode_attention,
    prefill_attention_bf16,
)

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class PrefillSpan:
    """One prefill chunk: query rows [start, end) of the batch, `ctx_len` keys in total."""

    start: int
    end: int
    ctx_len: int
    block_ids: torch.Tensor  # (num_blocks,) blocks holding keys [0, ctx_len)
    mask: torch.Tensor | None  # (T, ctx_len) bool; None when there is no cached prefix
    tiles: torch.Tensor | None = None  # the cache tiles to gather (see _gather_context)


@dataclass(slots=True)
class DecodeGroup:
    """Decode rows [start, end) of the batch, whose contexts are of similar length: their
    block tables are padded to the group's longest only."""

    start: int
    end: int
    block_tables: torch.Tensor  # (B, max_blocks) int64
    context_lens: torch.Tensor  # (B,) int64
    bias: torch.Tensor | None = None  # (B, 1, 1, max_blocks * block_size) 0 / -inf
    tiles: torch.Tensor | None = None  # the cache tiles to gather (see _decode_attention)
    # Where every layer gathers its K and V: allocated once a step, not once a layer (on CPUs
    # a fresh buffer of many MiB costs a page fault per 4 KiB, more than the copy itself).
    k_buf: torch.Tensor | None = None
    v_buf: torch.Tensor | None = None


@dataclass(slots=True)
class TritonBatch:
    """The whole batch as the triton kernels read it (CUDA)."""

    query_start_loc: torch.Tensor  # (num_seqs + 1,) int32
    seq_lens: torch.Tensor  # (num_seqs,) int32, this step's tokens included
    block_tables: torch.Tensor  # (num_seqs, max_blocks) int32, padded with block 0
    max_query_len: int


@dataclass(slots=True)
class AttnMetadata:
    """Where this step's keys go (`slot_mapping`) and what each query may read."""

    slot_mapping: torch.Tensor  # (T,) int64, cache slot of each batch token
    triton: TritonBatch | None = None  # on CUDA: the kernels' view, and nothing else
    num_decodes: int = 0
    cache_rows: torch.Tensor | None = None  # slot_mapping per KV head (see _cache_rows)
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    prefills: list[PrefillSpan] = field(default_factory=list)


# A decode group grows while its longest table is within this factor of its shortest (plus
# a few blocks): one long context no longer pads every short one in the batch to its length.
GROUP_SPREAD = 1.5
GROUP_SLACK_BLOCKS = 4


def build_attn_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
    allow_triton: bool = True,
) -> AttnMetadata:
    """Metadata for a batch whose first requests with query_len == 1 are the decodes (best
    sorted by context length, so that similar ones share a group).

    `context_lens[i]` counts request i's tokens including this step's (computed + new).
    """
    slots: list[int] = []
    for q_len, ctx_len, table in zip(query_lens, context_lens, block_tables):
        for pos in range(ctx_len - q_len, ctx_len):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    meta = AttnMetadata(slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device))
    if allow_triton and use_triton(device):  # not over a float8 cache (torch's path reads it)
        meta.triton = _triton_batch(query_lens, context_lens, block_tables, device)
        return meta
    num_decodes = 0
    while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
        num_decodes += 1
    meta.num_decodes = num_decodes
    start = 0
    while start < num_decodes:
        lengths = [len(t) for t in block_tables[start:num_decodes]]
        end, shortest, longest = start + 1, lengths[0], lengths[0]
        while end < num_decodes:
            n = lengths[end - start]
            if max(longest, n) > GROUP_SPREAD * min(shortest, n) + GROUP_SLACK_BLOCKS:
                break
            shortest, longest = min(shortest, n), max(longest, n)
            end += 1
        meta.decode_groups.append(
            _decode_group(start, end, context_lens, block_tables, longest, device)
        )
        start = end
    start = num_decodes
    for q_len, ctx_len, table in zip(
        query_lens[num_decodes:], context_lens[num_decodes:], block_tables[num_decodes:]
    ):
        mask = None
        if ctx_len > q_len:  # a cached prefix or earlier chunks: causal, offset
            q_pos = torch.arange(ctx_len - q_len, ctx_len, device=device)
            mask = torch.arange(ctx_len, device=device)[None, :] <= q_pos[:, None]
        num_blocks = -(-ctx_len // block_size)
        ids = torch.tensor(table[:num_blocks], dtype=torch.int64, device=device)
        meta.prefills.append(PrefillSpan(start, start + q_len, ctx_len, ids, mask))
        start += q_len
    return meta


def sequence_spans(meta: AttnMetadata) -> list[tuple[int, int]]:
    """The batch's sequences as (start, end) row ranges, in batch order: what an encoder
    attends within. Each decode row is a span of one, then each prefill span follows."""
    if meta.triton is not None:
        starts = meta.triton.query_start_loc.tolist()
        return list(zip(starts[:-1], starts[1:]))
    spans = [(row, row + 1) for g in meta.decode_groups for row in range(g.start, g.end)]
    spans.extend((p.start, p.end) for p in meta.prefills)
    return spans


def _triton_batch(query_lens, context_lens, block_tables, device) -> TritonBatch:
    width = max((len(t) for t in block_tables), default=1) or 1
    padded = [t + [0] * (width - len(t)) for t in block_tables]
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)

    def i32(values):  # noqa: E306
        return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)

    return TritonBatch(i32(starts), i32(context_lens), i32(padded), max(query_lens, default=0))


def use_triton(device: torch.device) -> bool:
    """The triton kernels on CUDA; `TANDEM_ATTENTION_BACKEND=triton` forces them anywhere
    (with `TRITON_INTERPRET=1`, on the CPU: how the tests run a whole model through them),
    `=torch` keeps torch's path on CUDA."""
    backend = os.environ.get("TANDEM_ATTENTION_BACKEND", "auto")
    if backend == "auto":
        return device.type == "cuda" and has_triton()
    return backend == "triton"


@functools.cache
def has_triton() -> bool:
    """Whether triton imports (it is a dependency; a broken install falls back to torch)."""
    try:
        import tandem.kernels.triton_attention  # noqa: F401
    except Exception:  # ImportError, or a triton that cannot find its compiler
        logger.warning("triton is unavailable: CUDA attention runs through torch")
        return False
    return True


def _decode_group(start, end, context_lens, block_tables, max_blocks, device):
    padded = [t + [0] * (max_blocks - len(t)) for t in block_tables[start:end]]
    tables = torch.tensor(padded, dtype=torch.int64, device=device)
    lens = torch.tensor(context_lens[start:end], dtype=torch.int64, device=device)
    return DecodeGroup(start, end, tables, lens)


def fused_decode_applies(meta: AttnMetadata, x: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether a batch's attention can run as one C++ call (`fused_decode_attention`,
    kernels/cpu.py's `decode_layers`): decode rows only, on a CPU, the cache in the
    activations' dtype (not float8), the kernels built."""
    return (
        not meta.prefills
        and meta.triton is None
        and x.device.type == "cpu"
        and x.dtype == k_cache.dtype
        and load_cpu_kernels()
    )


def fused_decode_attention(
    qkv: torch.Tensor,  # (T, (H + 2 Hkv) * D), the fused projection
    cos: torch.Tensor,  # (T, 1, D)
    signed_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttnMetadata,
    num_heads: int,
    scale: float,
) -> torch.Tensor | None:
    """RoPE, the cache write and attention of a decode-only batch on a CPU in one C++ call
    (kernels/cpu.py), from the fused projection: what `apply_rope` and `paged_attention`
    compute, the same bits, without their ~20 small ops a layer (at one row they cost more
    than the attention). None where it does not apply (prefill rows, CUDA, a float8 cache,
    no kernels): the caller takes the general path."""
    if not fused_decode_applies(meta, qkv, k_cache):
        return None
    groups = meta.decode_groups
    return decode_attention_rope(
        qkv.contiguous(), cos, signed_sin, k_cache, v_cache, meta.slot_mapping,
        [g.block_tables for g in groups], [g.context_lens for g in groups], num_heads, scale,
    )  # fmt: skip


def paged_attention(
    q: torch.Tensor,  # (T, H, D)
    k: torch.Tensor,  # (T, Hkv, D)
    v: torch.Tensor,  # (T, Hkv, D)
    k_cache: torch.Tensor,  # (num_blocks, Hkv, block_size, D)
    v_cache: torch.Tensor,
    meta: AttnMetadata,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend. Returns (T, H, D).

    A float8 cache (engine/kv_quant.py) stores K / k_scale and V / v_scale, saturated;
    reads widen it (in registers in the C++ decode kernel, else the gathered context).

    The cache is block-major and head-major inside a block: one block of one layer is a
    contiguous (Hkv, block_size, D) tile, so gathering a request's blocks copies whole tiles
    (2-3x faster than gathering per head on CPU), and a block moves between workers as one
    contiguous slice.
    """
    if meta.triton is not None:
        return _triton_attention(q, k, v, k_cache, v_cache, meta, scale)
    _, num_kv_heads, block_size, head_dim = k_cache.shape
    if meta.cache_rows is None:  # once per step: every layer writes the same rows
        meta.cache_rows = _cache_rows(meta.slot_mapping, num_kv_heads, block_size)
    rows = meta.cache_rows
    fp8 = is_fp8(k_cache.dtype)
    if fp8:
        k, v = quantize(k, k_scale, k_cache.dtype), quantize(v, v_scale, v_cache.dtype)
    as_bytes(k_cache).view(-1, head_dim).index_copy_(0, rows, as_bytes(k).reshape(-1, head_dim))
    as_bytes(v_cache).view(-1, head_dim).index_copy_(0, rows, as_bytes(v).reshape(-1, head_dim))
    out = torch.empty_like(q)
    scales = (k_scale, v_scale) if fp8 else (1.0, 1.0)
    for g in meta.decode_groups:
        out[g.start : g.end] = _decode_attention(
            q[g.start : g.end], k_cache, v_cache, g, scale, *scales
        )
    if fp8 and meta.prefills:  # the chunk's keys as stored: prefill reads what decode will
        k = dequantize(k, k_scale, q.dtype)
        v = dequantize(v, v_scale, q.dtype)
    bf16_kernel = (
        q.dtype == torch.bfloat16
        and q.device.type == "cpu"
        and head_dim in (32, 64, 128)
        and has_prefill_attention_bf16()
    )
    for span in meta.prefills:
        if bf16_kernel:
            out[span.start : span.end] = _prefill_bf16(
                q, k, v, k_cache, v_cache, span, scale, *scales
            )
            continue
        qp = q[span.start : span.end].transpose(0, 1).unsqueeze(0)  # (1, H, T, D)
        if span.mask is None:  # the whole context is this chunk: no cache read needed
            kp = k[span.start : span.end].transpose(0, 1).unsqueeze(0)  # (1, Hkv, T, D)
            vp = v[span.start : span.end].transpose(0, 1).unsqueeze(0)
        else:
            kp = _gather_context(k_cache, span, q.dtype, scales[0])  # (1, Hkv, ctx, D)
            vp = _gather_context(v_cache, span, q.dtype, scales[1])
        op = F.scaled_dot_product_attention(
            qp,
            kp,
            vp,
            attn_mask=span.mask,
            is_causal=span.mask is None,
            scale=scale,
            enable_gqa=True,
        )
        out[span.start : span.end] = op[0].transpose(0, 1)  # (T, H, D)
    return out


def _triton_attention(q, k, v, k_cache, v_cache, meta: AttnMetadata, scale: float):
    from tandem.kernels.triton_attention import reshape_and_cache, unified_attention

    b = meta.triton
    reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping)
    out = q.new_empty(q.shape)  # contiguous (q is a view into the fused projection)
    return unified_attention(
        q, k_cache, v_cache, out, b.query_start_loc, b.seq_lens, b.block_tables,
        b.max_query_len, scale,
    )  # fmt: skip


def _prefill_bf16(q, k, v, k_cache, v_cache, span: PrefillSpan, scale: float,
                  k_scale: float = 1.0, v_scale: float = 1.0):  # fmt: skip
    """The C++ kernel's causal prefill (kernels/cpu.py), K and V as (Hkv, S, D)."""
    if span.mask is None:  # the whole context is this chunk
        kp = k[span.start : span.end].transpose(0, 1).contiguous()
        vp = v[span.start : span.end].transpose(0, 1).contiguous()
        k_scale = v_scale = 1.0  # the chunk's own keys, widened already
    else:  # a float8 cache's context stays float8: the kernel widens it as it repacks
        kp = _contiguous(_gather_context(k_cache, span, None)[0])
        vp = _contiguous(_gather_context(v_cache, span, None)[0])
    return prefill_attention_bf16(q[span.start : span.end].contiguous(), kp, vp, scale,
                                  True, k_scale, v_scale)  # fmt: skip


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return as_bytes(t).contiguous().view(t.dtype)


def _cache_rows(slot_mapping: torch.Tensor, num_kv_heads: int, block_size: int) -> torch.Tensor:
    """(T,) slots -> (T * Hkv,) rows of the cache viewed as (num_blocks * Hkv * bs, D)."""
    block, offset = slot_mapping // block_size, slot_mapping % block_size
    heads = torch.arange(num_kv_heads, device=slot_mapping.device) * block_size
    return ((block * (num_kv_heads * block_size) + offset)[:, None] + heads[None, :]).view(-1)


def _gather_context(cache: torch.Tensor, span: PrefillSpan, dtype: torch.dtype | None,
                    kv_scale: float = 1.0) -> torch.Tensor:  # fmt: skip
    """A request's first `ctx_len` keys (or values) as (1, Hkv, ctx_len, D): its tiles
    gathered head-major (tile `block * Hkv + head`) in one copy, no transpose after; a
    float8 cache's widened to `dtype` (the gathered context only, never the cache), or
    left as it is stored with dtype None."""
    _, num_kv_heads, block_size, head_dim = cache.shape
    if span.tiles is None:  # once per step: every layer gathers the same tiles
        heads = torch.arange(num_kv_heads, device=cache.device)
        span.tiles = (span.block_ids[None, :] * num_kv_heads + heads[:, None]).view(-1)
    tiles = as_bytes(cache).view(-1, block_size, head_dim).index_select(0, span.tiles)
    if is_fp8(cache.dtype):  # (Hkv * n, bs, D)
        tiles = tiles.view(cache.dtype)
        if dtype is not None:
            tiles = dequantize(tiles, kv_scale, dtype)
    return tiles.view(num_kv_heads, -1, head_dim)[:, : span.ctx_len].unsqueeze(0)


def _decode_attention(q, k_cache, v_cache, rows: DecodeGroup, scale: float,
                      k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:  # fmt: skip
    """One query token per request, over its context.

    On CPUs with the C++ kernel built, read straight off the cache (kernels/cpu.py: at
    batch 32 and 192 tokens of context 2-3x faster than what follows). Otherwise
    gathered per KV head: the cache seen as (blocks * Hkv) tiles of (block_size, D): gathering tile
    `block * Hkv + head` for each request, head and block gives (B, Hkv, ctx, D) in one
    index_select, contiguous, so scores and outputs are one batched matmul per group of
    query heads sharing a KV head (no K/V repeat, no transpose copy).
    """
    if q.device.type == "cpu" and load_cpu_kernels():
        return paged_decode_attention(q.contiguous(), k_cache, v_cache, rows.block_tables,
                                      rows.context_lens, scale, k_scale, v_scale)  # fmt: skip
    nd, num_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    if rows.bias is None:  # once per step, like the tiles
        key_pos = torch.arange(rows.block_tables.shape[1] * block_size, device=q.device)
        visible = (key_pos[None, :] < rows.context_lens[:, None]).view(nd, 1, 1, -1)
        rows.bias = torch.zeros(visible.shape, device=q.device).masked_fill_(
            ~visible, float("-inf")
        )
    if rows.tiles is None:  # once per step: every layer gathers the same tiles
        heads = torch.arange(num_kv_heads, device=q.device)
        rows.tiles = (rows.block_tables[:, None, :] * num_kv_heads + heads[None, :, None]).view(-1)
    ctx = rows.block_tables.shape[1] * block_size
    if rows.k_buf is None:
        rows.k_buf = k_cache.new_empty(rows.tiles.shape[0], block_size, head_dim)
        rows.v_buf = torch.empty_like(rows.k_buf)
    kd = torch.index_select(as_bytes(k_cache).view(-1, block_size, head_dim), 0, rows.tiles,
                            out=as_bytes(rows.k_buf))  # fmt: skip
    vd = torch.index_select(as_bytes(v_cache).view(-1, block_size, head_dim), 0, rows.tiles,
                            out=as_bytes(rows.v_buf))  # fmt: skip
    if is_fp8(k_cache.dtype):  # widened after the gather: the context only
        kd = dequantize(kd.view(k_cache.dtype), k_scale, q.dtype)
        vd = dequantize(vd.view(v_cache.dtype), v_scale, q.dtype)
    kd = kd.view(nd, num_kv_heads, ctx, head_dim)
    vd = vd.view(nd, num_kv_heads, ctx, head_dim)
    qd = q.view(nd, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.matmul(qd, kd.transpose(-1, -2)).float()  # (B, Hkv, G, ctx)
    probs = scores.mul_(scale).add_(rows.bias).softmax(dim=-1).to(q.dtype)  # in place
    return torch.matmul(probs, vd).reshape(nd, num_heads, head_dim)  # (B, Hkv, G, D)
