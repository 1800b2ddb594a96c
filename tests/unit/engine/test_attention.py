"""Paged attention against plain attention over each request's contiguous keys: decodes
grouped by context length, prefill chunks over a cached prefix. Decodes on both CPU paths:
the C++ kernel and torch's gather."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tandem.engine import attention
from tandem.engine.attention import build_attn_metadata, paged_attention


@pytest.fixture
def torch_path(monkeypatch):
    """Decode attention through torch's gather, as where the C++ kernel is not built."""
    monkeypatch.setattr(attention, "load_cpu_kernels", lambda: False)


def _reference(q, keys, values, scale):
    """One request: q (T, H, D) over keys/values (ctx, Hkv, D), causal at the end."""
    t, h, _ = q.shape
    ctx, hkv, _ = keys.shape
    k = keys.repeat_interleave(h // hkv, dim=1).transpose(0, 1)  # (H, ctx, D)
    v = values.repeat_interleave(h // hkv, dim=1).transpose(0, 1)
    mask = torch.arange(ctx)[None, :] <= torch.arange(ctx - t, ctx)[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_decodes_of_very_different_lengths_group_and_match_plain_attention(path, request):
    if path == "torch":
        request.getfixturevalue("torch_path")
    torch.manual_seed(0)
    bs, heads, kv_heads, dim, num_blocks = 4, 6, 2, 8, 200
    k_cache = torch.zeros(num_blocks, kv_heads, bs, dim)
    v_cache = torch.zeros(num_blocks, kv_heads, bs, dim)
    # five decodes (short to long) and one prefill chunk of 5 over a cached prefix of 7
    ctx = [5, 7, 9, 150, 160, 12]
    q_lens = [1, 1, 1, 1, 1, 5]
    free = iter(torch.randperm(num_blocks).tolist())
    tables = [[next(free) for _ in range(-(-c // bs))] for c in ctx]
    history = [(torch.randn(c, kv_heads, dim), torch.randn(c, kv_heads, dim)) for c in ctx]
    for (keys, values), table, c, q_len in zip(history, tables, ctx, q_lens):
        for pos in range(c - q_len):  # what earlier steps cached
            k_cache[table[pos // bs], :, pos % bs] = keys[pos]
            v_cache[table[pos // bs], :, pos % bs] = values[pos]
    meta = build_attn_metadata(q_lens, ctx, tables, bs, torch.device("cpu"))
    assert [(g.start, g.end) for g in meta.decode_groups] == [(0, 3), (3, 5)]
    assert meta.decode_groups[0].block_tables.shape[1] == 3  # not padded to 40 blocks
    q = torch.randn(sum(q_lens), heads, dim)
    k_new = torch.cat([keys[c - n :] for (keys, _), c, n in zip(history, ctx, q_lens)])
    v_new = torch.cat([values[c - n :] for (_, values), c, n in zip(history, ctx, q_lens)])
    out = paged_attention(q, k_new, v_new, k_cache, v_cache, meta, scale=dim**-0.5)
    row = 0
    for (keys, values), n in zip(history, q_lens):
        want = _reference(q[row : row + n], keys, values, dim**-0.5)
        assert torch.allclose(out[row : row + n], want, atol=1e-5)
        row += n


def test_every_layer_of_a_step_gathers_into_the_same_buffers_and_stays_exact(torch_path):
    torch.manual_seed(1)
    bs, heads, kv_heads, dim, num_blocks, ctx = 4, 6, 2, 8, 64, [6, 9, 11]
    tables = [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(len(ctx))]
    meta = build_attn_metadata([1] * len(ctx), ctx, tables, bs, torch.device("cpu"))
    (group,) = meta.decode_groups
    buffers = None
    for _layer in range(3):  # each layer its own cache, the same metadata
        k_cache = torch.randn(num_blocks, kv_heads, bs, dim)
        v_cache = torch.randn(num_blocks, kv_heads, bs, dim)
        q = torch.randn(len(ctx), heads, dim)
        k_new, v_new = torch.randn(len(ctx), kv_heads, dim), torch.randn(len(ctx), kv_heads, dim)
        out = paged_attention(q, k_new, v_new, k_cache, v_cache, meta, scale=0.5)
        if buffers is None:
            buffers = (group.k_buf.data_ptr(), group.v_buf.data_ptr())
        assert (group.k_buf.data_ptr(), group.v_buf.data_ptr()) == buffers
        for i, (c, table) in enumerate(zip(ctx, tables)):
            keys = k_cache[table].transpose(0, 1).reshape(kv_heads, -1, dim)[:, :c]
            values = v_cache[table].transpose(0, 1).reshape(kv_heads, -1, dim)[:, :c]
            want = _reference(q[i : i + 1], keys.transpose(0, 1), values.transpose(0, 1), 0.5)
            assert torch.allclose(out[i : i + 1], want, atol=1e-5)


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_mixed_batch_over_an_fp8_cache_matches_plain_attention_dequantized(
    path, fp8, dtype, request
):
    """Decodes and a prefill chunk over a cached prefix, the cache in float8 with scales
    (head size 64, the AVX-512 path, and GQA): the step stores K / k_scale saturated, and
    every read equals plain attention over the stored values widened back."""
    from tandem.engine.kv_quant import dequantize, quantize

    if path == "torch":
        request.getfixturevalue("torch_path")
    torch.manual_seed(2)
    bs, heads, kv_heads, dim, num_blocks, k_scale, v_scale = 16, 6, 2, 64, 64, 0.05, 0.01
    k_cache = torch.zeros(num_blocks, kv_heads, bs, dim, dtype=fp8)
    v_cache = torch.zeros_like(k_cache)
    ctx, q_lens = [5, 40, 70], [1, 1, 30]  # the chunk: 30 new tokens after 40 cached
    free = iter(torch.randperm(num_blocks).tolist())
    tables = [[next(free) for _ in range(-(-c // bs))] for c in ctx]
    history = [(torch.randn(c, kv_heads, dim).to(dtype), torch.randn(c, kv_heads, dim).to(dtype))
               for c in ctx]  # fmt: skip
    for (keys, values), table, c, q_len in zip(history, tables, ctx, q_lens):
        for pos in range(c - q_len):
            k_cache[table[pos // bs], :, pos % bs] = quantize(keys[pos], k_scale, fp8)
            v_cache[table[pos // bs], :, pos % bs] = quantize(values[pos], v_scale, fp8)
    meta = build_attn_metadata(q_lens, ctx, tables, bs, torch.device("cpu"))
    q = torch.randn(sum(q_lens), heads, dim).to(dtype)
    k_new = torch.cat([keys[c - n :] for (keys, _), c, n in zip(history, ctx, q_lens)])
    v_new = torch.cat([values[c - n :] for (_, values), c, n in zip(history, ctx, q_lens)])
    out = paged_attention(q, k_new, v_new, k_cache, v_cache, meta, dim**-0.5, k_scale, v_scale)
    row = 0
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for (keys, values), n in zip(history, q_lens):
        stored_k = dequantize(quantize(keys, k_scale, fp8), k_scale, torch.float32)
        stored_v = dequantize(quantize(values, v_scale, fp8), v_scale, torch.float32)
        want = _reference(q[row : row + n].float(), stored_k, stored_v, dim**-0.5)
        torch.testing.assert_close(out[row : row + n].float(), want, atol=tol, rtol=tol)
        row += n
    table = tables[2]  # the chunk's own keys were stored too, saturated and scaled
    last = k_cache[table[69 // bs], :, 69 % bs]
    assert torch.equal(
        last.view(torch.uint8), quantize(history[2][0][69], k_scale, fp8).view(torch.uint8)
    )
