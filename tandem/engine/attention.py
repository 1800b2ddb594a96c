"""Paged attention on top of torch: KV lives in fixed-size blocks, read through block tables.

The batch is flat (all requests' tokens concatenated, decodes first). Decodes (one query
token each) share one batched call over their gathered blocks; each prefill chunk gets its
own call, causal over its cached prefix plus itself. Only the blocks a request owns are
read: never a copy of the whole cache. Metadata is built once per step, not per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillSpan:
    """One prefill chunk: query rows [start, end) of the batch, `ctx_len` keys in total."""

    start: int
    end: int
    ctx_len: int
    block_ids: torch.Tensor  # (num_blocks,) blocks holding keys [0, ctx_len)
    mask: torch.Tensor | None  # (T, ctx_len) bool; None when there is no cached prefix


@dataclass(slots=True)
class AttnMetadata:
    """Where this step's keys go (`slot_mapping`) and what each query may read."""

    slot_mapping: torch.Tensor  # (T,) int64, cache slot of each batch token
    num_decodes: int = 0
    decode_block_tables: torch.Tensor | None = None  # (B, max_blocks) int64
    decode_bias: torch.Tensor | None = None  # (B, 1, max_blocks * block_size) 0 / -inf
    prefills: list[PrefillSpan] = field(default_factory=list)


def build_attn_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
) -> AttnMetadata:
    """Metadata for a batch whose first requests with query_len == 1 are the decodes.

    `context_lens[i]` counts request i's tokens including this step's (computed + new).
    """
    slots: list[int] = []
    for q_len, ctx_len, table in zip(query_lens, context_lens, block_tables):
        for pos in range(ctx_len - q_len, ctx_len):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    meta = AttnMetadata(slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device))
    num_decodes = 0
    while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
        num_decodes += 1
    if num_decodes:
        max_blocks = max(len(t) for t in block_tables[:num_decodes])
        padded = [t + [0] * (max_blocks - len(t)) for t in block_tables[:num_decodes]]
        lens = torch.tensor(context_lens[:num_decodes], device=device)
        key_pos = torch.arange(max_blocks * block_size, device=device)
        meta.num_decodes = num_decodes
        meta.decode_block_tables = torch.tensor(padded, dtype=torch.int64, device=device)
        visible = (key_pos[None, :] < lens[:, None]).view(num_decodes, 1, -1)
        meta.decode_bias = torch.zeros(visible.shape, device=device).masked_fill_(
            ~visible, float("-inf")
        )
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


def paged_attention(
    q: torch.Tensor,  # (T, H, D)
    k: torch.Tensor,  # (T, Hkv, D)
    v: torch.Tensor,  # (T, Hkv, D)
    k_cache: torch.Tensor,  # (Hkv, num_blocks, block_size, D)
    v_cache: torch.Tensor,
    meta: AttnMetadata,
    scale: float,
) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend. Returns (T, H, D).

    The cache is head-major so that a gather of blocks is already (Hkv, tokens, D): the
    layout attention reads, with no transpose copy.
    """
    num_kv_heads, _, _, head_dim = k_cache.shape
    k_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
    v_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        out[:nd] = _decode_attention(q[:nd], k_cache, v_cache, meta, scale)
    for span in meta.prefills:
        qp = q[span.start : span.end].transpose(0, 1).unsqueeze(0)  # (1, H, T, D)
        if span.mask is None:  # the whole context is this chunk: no cache read needed
            kp = k[span.start : span.end].transpose(0, 1).unsqueeze(0)  # (1, Hkv, T, D)
            vp = v[span.start : span.end].transpose(0, 1).unsqueeze(0)
        else:
            kp = _gather(k_cache, span.block_ids)[:, : span.ctx_len].unsqueeze(
                0
            )  # (1, Hkv, ctx, D)
            vp = _gather(v_cache, span.block_ids)[:, : span.ctx_len].unsqueeze(0)
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


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """(Hkv, num_blocks, bs, D) -> (Hkv, len(block_ids) * bs, D), blocks in table order."""
    num_kv_heads, _, _, head_dim = cache.shape
    return cache.index_select(1, block_ids).view(num_kv_heads, -1, head_dim)


def _decode_attention(q, k_cache, v_cache, meta: AttnMetadata, scale: float) -> torch.Tensor:
    """One query token per request. Plain matmuls beat SDPA's CPU kernel at this shape."""
    nd, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[0]
    tables = meta.decode_block_tables.view(-1)
    # Fold the query heads of a KV group into the query-length axis: no K/V repeat.
    qd = q.view(nd, num_kv_heads, -1, head_dim).transpose(0, 1)  # (Hkv, B, G, D)
    kd = _gather(k_cache, tables).view(num_kv_heads, nd, -1, head_dim)  # (Hkv, B, L, D)
    vd = _gather(v_cache, tables).view(num_kv_heads, nd, -1, head_dim)
    scores = torch.matmul(qd, kd.transpose(-1, -2)).float() * scale  # (Hkv, B, G, L)
    probs = (scores + meta.decode_bias).softmax(dim=-1).to(q.dtype)
    out = torch.matmul(probs, vd)  # (Hkv, B, G, D)
    return out.transpose(0, 1).reshape(nd, num_heads, head_dim)
