"""Plain-torch references of the triton kernels (`triton_attention.py`): slow, simple, on
any device; what the kernel tests compare against."""

from __future__ import annotations

import torch


def reshape_and_cache_ref(k, v, k_cache, v_cache, slot_mapping) -> None:
    block_size = k_cache.shape[2]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        k_cache[slot // block_size, :, slot % block_size] = k[t].to(k_cache.dtype)
        v_cache[slot // block_size, :, slot % block_size] = v[t].to(v_cache.dtype)


def unified_attention_ref(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale):
    """Each sequence's query rows attend, causally with its prefix before them, over its
    keys gathered from the cache; in fp32. Returns (T, H, D) in q's dtype."""
    num_heads = q.shape[1]
    _, num_kv_heads, block_size, head_dim = k_cache.shape
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        begin, end = starts[i], starts[i + 1]
        q_len = end - begin
        if q_len == 0:
            continue
        blocks = block_tables[i, : -(-seq_len // block_size)].long()
        keys = k_cache[blocks].transpose(0, 1).reshape(num_kv_heads, -1, head_dim)[:, :seq_len]
        values = v_cache[blocks].transpose(0, 1).reshape(num_kv_heads, -1, head_dim)[:, :seq_len]
        group = num_heads // num_kv_heads
        keys = keys.float().repeat_interleave(group, 0)  # (H, S, D)
        values = values.float().repeat_interleave(group, 0)
        scores = torch.einsum("thd,hsd->hts", q[begin:end].float(), keys) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
        visible = torch.arange(seq_len)[None, :] <= q_pos
        scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
        out[begin:end] = torch.einsum("hts,hsd->thd", scores.softmax(-1), values).to(q.dtype)
    return out
