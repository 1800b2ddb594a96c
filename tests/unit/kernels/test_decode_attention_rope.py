"""The fused decode attention (`decode_attention_rope`: RoPE, the cache write and paged
attention in one C++ call) against the general path it replaces (`apply_rope`, then
`paged_attention`): the same bits out, the same bits in the cache."""

from __future__ import annotations

import os

import pytest
import torch

from tandem.engine.attention import build_attn_metadata, fused_decode_attention, paged_attention
from tandem.engine.models.layers import apply_rope, rope_cos_sin
from tandem.kernels import cpu as cpu_kernels

pytestmark = pytest.mark.skipif(
    os.environ.get("TANDEM_CPU_KERNELS") == "0", reason="CPU kernels switched off"
)


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    assert cpu_kernels.load_cpu_kernels(), "the CPU kernels did not build (see the log)"


def _batch(dtype, ctx, heads=6, kv_heads=2, dim=64, bs=4, num_blocks=300, seed=0):
    """A decode batch (one token a request at context lengths `ctx`) over a filled cache."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, kv_heads, bs, dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, kv_heads, bs, dim, generator=g).to(dtype)
    free = iter(torch.randperm(num_blocks, generator=g).tolist())
    tables = [[next(free) for _ in range(-(-c // bs))] for c in ctx]
    meta = build_attn_metadata([1] * len(ctx), ctx, tables, bs, torch.device("cpu"))
    qkv = torch.randn(len(ctx), (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    cos, sin = rope_cos_sin(dim, 10000.0, None, 512)
    positions = torch.tensor([c - 1 for c in ctx])
    cos = cos[positions].to(dtype).unsqueeze(1)
    sin = sin[positions].to(dtype).unsqueeze(1)
    return qkv, cos, sin, k_cache, v_cache, meta, heads, kv_heads, dim


def _general(qkv, cos, sin, k_cache, v_cache, meta, heads, kv_heads, dim):
    """The model's unfused path (llama.Attention.forward before the projection out)."""
    T = qkv.shape[0]
    qk, v = qkv.split([(heads + kv_heads) * dim, kv_heads * dim], dim=-1)
    qk = apply_rope(qk.view(T, heads + kv_heads, dim), cos, sin)
    q, k = qk.split([heads, kv_heads], dim=1)
    out = paged_attention(q, k, v.view(T, kv_heads, dim), k_cache, v_cache, meta, dim**-0.5)
    return out.reshape(T, heads * dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_gives_the_general_paths_bits(dtype):
    """Several decode groups (very different lengths), GQA: output and both caches equal."""
    ctx = [5, 7, 9, 150, 160, 1]
    qkv, cos, sin, k_cache, v_cache, meta, heads, kv_heads, dim = _batch(dtype, ctx)
    assert len(meta.decode_groups) == 3
    k2, v2 = k_cache.clone(), v_cache.clone()
    want = _general(qkv, cos, sin, k_cache, v_cache, meta, heads, kv_heads, dim)
    meta.cache_rows = None
    got = fused_decode_attention(qkv, cos, sin, k2, v2, meta, heads, dim**-0.5)
    assert got is not None and got.dtype == dtype
    assert torch.equal(got, want)
    assert torch.equal(k2, k_cache) and torch.equal(v2, v_cache)


def test_a_batch_with_a_prefill_takes_the_general_path():
    qkv, cos, sin, k_cache, v_cache, _, heads, _, dim = _batch(torch.float32, [9])
    meta = build_attn_metadata([1, 3], [9, 3], [[0, 1, 2], [3]], 4, torch.device("cpu"))
    qkv = torch.cat([qkv, qkv, qkv, qkv])
    assert fused_decode_attention(qkv, cos, sin, k_cache, v_cache, meta, heads, 0.1) is None


def test_a_slot_outside_the_cache_is_refused_with_a_message():
    qkv, cos, sin, k_cache, v_cache, meta, heads, _, dim = _batch(torch.float32, [9])
    meta.slot_mapping = torch.tensor([k_cache.shape[0] * k_cache.shape[2]])
    with pytest.raises(RuntimeError, match="a slot outside the cache"):
        fused_decode_attention(qkv, cos, sin, k_cache, v_cache, meta, heads, dim**-0.5)
