"""The FP8 KV cache's pure parts: the saturating store, re-quantizing blocks that come
under other scales, the hand-off's bytes, and the flag."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.config import CacheConfig
from tandem.engine.kv_quant import dequantize, kv_torch_dtype, quantize, requantize
from tandem.services.transport.kv_transfer import kv_from_chunk, kv_to_chunks

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("dtype", FP8)
def test_the_store_saturates_and_never_makes_nan_or_inf(dtype):
    x = torch.tensor([0.0, 1e-9, -3.0, 1e6, -1e6, float("inf"), 7.0])
    q = quantize(x, 0.5, dtype)
    back = dequantize(q, 0.5, torch.float32)
    limit = torch.finfo(dtype).max * 0.5
    assert torch.isfinite(back).all()
    assert back[3] == limit and back[4] == -limit and back[5] == limit
    assert back[2] == -3.0 and back[6] == 7.0 and back[0] == 0.0


@pytest.mark.parametrize("dtype", FP8)
def test_blocks_under_other_scales_are_requantized_to_ours(dtype):
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(3, 2, 2, 2, 16, 8, generator=g)  # (blocks, layers, K/V, Hkv, bs, D)
    sent, own = [0.5, 0.25, 0.1, 2.0], [0.4, 0.3, 0.1, 1.0]
    theirs = torch.empty(wide.shape, dtype=dtype)
    for layer in range(2):
        for kv in range(2):
            theirs[:, layer, kv] = quantize(wide[:, layer, kv], sent[2 * layer + kv], dtype)
    ours = requantize(theirs, sent, own)
    for layer in range(2):
        for kv in range(2):
            i = 2 * layer + kv
            want = quantize(dequantize(theirs[:, layer, kv], sent[i], torch.float32), own[i], dtype)
            assert torch.equal(ours[:, layer, kv].view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(ours[:, 1, 0].view(torch.uint8), theirs[:, 1, 0].view(torch.uint8))


@pytest.mark.parametrize("dtype", FP8)
def test_fp8_blocks_cross_the_wire_byte_for_byte(dtype):
    tiles = quantize(torch.randn(5, 2, 2, 2, 16, 8), 0.1, dtype)
    chunks = kv_to_chunks("r", tiles, max_bytes=3 * tiles[0].numel())
    assert [c.num_blocks for c in chunks] == [3, 2] and chunks[0].dtype == str(dtype)[6:]
    back = torch.cat([kv_from_chunk(c, tuple(tiles.shape[1:])).view(torch.uint8) for c in chunks])
    assert torch.equal(back, tiles.view(torch.uint8))


def test_the_kv_cache_dtype_flag():
    assert kv_torch_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert kv_torch_dtype("fp8", torch.float32) == torch.float8_e4m3fn
    assert kv_torch_dtype("fp8_e4m3", torch.float32) == torch.float8_e4m3fn
    assert kv_torch_dtype("fp8_e5m2", torch.float32) == torch.float8_e5m2
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        CacheConfig(cache_dtype="int8")
