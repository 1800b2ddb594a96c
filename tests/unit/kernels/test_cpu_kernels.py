"""The C++ CPU kernels against plain torch. Paged decode attention: head sizes the kernel
unrolls and others, GQA groups, contexts that end inside a block, scattered blocks, fp32
and bf16. RMSNorm, alone and after the residual add, against Hugging Face's."""

from __future__ import annotations

import os
import time

import pytest
import torch

from tandem.kernels.cpu import (
    STALE_LOCK_S,
    add_rms_norm,
    clear_stale_lock,
    has_prefill_attention_bf16,
    load_cpu_kernels,
    paged_decode_attention,
    paged_decode_attention_ref,
    prefill_attention_bf16,
    prefill_attention_ref,
    rms_norm,
    rms_norm_ref,
)

pytestmark = pytest.mark.skipif(
    os.environ.get("TANDEM_CPU_KERNELS") == "0", reason="CPU kernels switched off"
)


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    assert load_cpu_kernels(), "the CPU kernels did not build (see the log)"


def _case(batch, heads, kv_heads, dim, block_size, lens, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = 3 * sum(-(-n // block_size) for n in lens) + 5
    k_cache = torch.randn(num_blocks, kv_heads, block_size, dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, kv_heads, block_size, dim, generator=g).to(dtype)
    max_blocks = max(-(-n // block_size) for n in lens) + 1  # padded tables, like the engine
    perm = torch.randperm(num_blocks, generator=g)
    tables = perm[: batch * max_blocks].view(batch, max_blocks).contiguous()
    q = torch.randn(batch, heads, dim, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int64)


@pytest.mark.parametrize(
    "heads,kv_heads,dim,block_size,lens",
    [
        (9, 3, 64, 16, [1, 17, 192, 250]),  # SmolLM2's heads; the unrolled head size
        (8, 2, 128, 16, [5, 64, 100]),  # the other unrolled size
        (6, 6, 48, 8, [3, 40, 41]),  # no GQA; a generic head size
        (12, 4, 20, 4, [2, 9, 33, 70]),  # neither a multiple of 16 nor a power of two
        (4, 1, 64, 16, [1000]),  # a long context: the softmax's tail loop and many tiles
        (10, 2, 64, 8, [3, 40, 129]),  # groups of 5: four heads at a time, then one
        (6, 2, 128, 32, [1, 31, 33, 70]),  # groups of 3 at 128: two heads, then one
        (2, 2, 64, 16, [16, 17]),  # one head per group
    ],
)
def test_kernel_matches_plain_torch_in_fp32(heads, kv_heads, dim, block_size, lens):
    q, k, v, tables, ctx = _case(len(lens), heads, kv_heads, dim, block_size, lens, torch.float32)
    scale = dim**-0.5
    got = paged_decode_attention(q, k, v, tables, ctx, scale)
    want = paged_decode_attention_ref(q, k, v, tables, ctx, scale)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_kernel_reads_only_each_requests_own_blocks():
    q, k, v, tables, ctx = _case(3, 9, 3, 64, 16, [20, 33, 7], torch.float32)
    before = paged_decode_attention(q, k, v, tables, ctx, 0.125)
    used = {int(b) for i, n in enumerate(ctx.tolist()) for b in tables[i, : -(-n // 16)]}
    for b in range(k.shape[0]):
        if b not in used:
            k[b].fill_(float("nan"))
            v[b].fill_(float("nan"))
    k[tables[0, 1], :, 4:] = float("nan")  # past request 0's 20th key, in its last block
    after = paged_decode_attention(q, k, v, tables, ctx, 0.125)
    assert torch.equal(before, after)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (8, 2, 128), (6, 6, 48)])
def test_kernel_in_half_precision_is_close_to_fp32(dtype, heads, kv_heads, dim):
    lens = [30, 64, 128, 5]
    q, k, v, tables, ctx = _case(4, heads, kv_heads, dim, 16, lens, dtype)
    got = paged_decode_attention(q, k, v, tables, ctx, 0.125)
    want = paged_decode_attention_ref(q.float(), k.float(), v.float(), tables, ctx, 0.125)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "heads,kv_heads,dim,lens",
    [(9, 3, 64, [1, 17, 100]), (8, 2, 128, [5, 64, 77]), (6, 6, 48, [3, 40]), (4, 4, 32, [9])],
)
def test_kernel_over_an_fp8_cache_matches_torch_dequantizing_first(
    fp8, q_dtype, heads, kv_heads, dim, lens
):
    """The cache holds K / k_scale and V / v_scale in float8; the kernel widens each tile in
    registers (AVX-512 at head sizes 64 and 128, the scalar loop otherwise) and scales back;
    the reference dequantizes the whole cache first."""
    from tandem.engine.kv_quant import quantize

    q, k, v, tables, ctx = _case(len(lens), heads, kv_heads, dim, 16, lens, torch.float32)
    k_scale, v_scale = 0.02, 0.5
    k8 = quantize(k * 3, k_scale, fp8)  # subnormals, and values past the format's range
    v8 = quantize(v, v_scale, fp8)
    q = q.to(q_dtype)
    got = paged_decode_attention(q, k8, v8, tables, ctx, dim**-0.5, k_scale, v_scale)
    want = paged_decode_attention_ref(q.float(), k8.float() * k_scale, v8.float() * v_scale,
                                      tables, ctx, dim**-0.5)  # fmt: skip
    assert got.dtype == q_dtype
    tol = 2e-6 if q_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol * 5)


@pytest.mark.parametrize("dim", [64, 48])  # the AVX-512 widening, and the scalar loop's
@pytest.mark.parametrize("fp8", FP8)
def test_fp8_widening_is_exact_for_every_code(fp8, dim):
    """Every finite code of the format (subnormals, the largest, both zeros), as a request's
    one value: attention over one key returns it as the kernel widened it; torch's own
    conversion is the reference."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[codes.view(fp8).float().isfinite()]
    n = codes.numel()
    v_cache = codes.view(fp8)[:, None, None, None].expand(n, 1, 16, dim).contiguous()
    k_cache = torch.zeros_like(v_cache)
    q = torch.randn(n, 1, dim)
    tables = torch.arange(n).view(n, 1)
    out = paged_decode_attention(q, k_cache, v_cache, tables, torch.ones(n, dtype=torch.int64),
                                 1.0)  # fmt: skip
    want = codes.view(fp8).float()[:, None].expand(n, dim)
    assert torch.equal(out[:, 0], want)


@pytest.fixture
def bf16_prefill():
    if not has_prefill_attention_bf16():
        pytest.skip("built without AVX-512 BF16")


@pytest.mark.usefixtures("bf16_prefill")
@pytest.mark.parametrize(
    "t,s,heads,kv_heads,dim",
    [
        (37, 37, 9, 3, 64),  # a whole prompt; queries not a multiple of the row block
        (1, 1, 9, 3, 64),  # one token
        (20, 83, 9, 3, 64),  # a chunk after 63 cached tokens: causal, offset
        (64, 64, 8, 2, 128),  # head size 128, groups of 4
        (17, 50, 4, 4, 128),  # no GQA, an offset chunk
        (300, 300, 6, 2, 64),  # many key blocks
        (45, 45, 12, 12, 32),  # head size 32 (all-MiniLM-L6-v2's)
    ],
)
@pytest.mark.parametrize("causal", [True, False])  # False: an encoder's, every key
def test_bf16_prefill_kernel_matches_fp32_attention(t, s, heads, kv_heads, dim, causal):
    g = torch.Generator().manual_seed(t * 1000 + s)
    q = torch.randn(t, heads, dim, generator=g).to(torch.bfloat16)
    k = torch.randn(kv_heads, s, dim, generator=g).to(torch.bfloat16)
    v = torch.randn(kv_heads, s, dim, generator=g).to(torch.bfloat16)
    got = prefill_attention_bf16(q, k, v, dim**-0.5, causal)
    want = prefill_attention_ref(q, k, v, dim**-0.5, causal)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.usefixtures("bf16_prefill")
@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("t,s,heads,kv_heads,dim", [(20, 83, 9, 3, 64), (17, 50, 8, 2, 128)])
def test_bf16_prefill_kernel_over_fp8_keys_matches_torch_dequantizing_first(
    fp8, t, s, heads, kv_heads, dim
):
    """A chunk after cached tokens of an FP8 cache: K and V stay float8, the kernel widens
    and scales them as it repacks them; the reference dequantizes first."""
    from tandem.engine.kv_quant import dequantize, quantize

    g = torch.Generator().manual_seed(s)
    q = torch.randn(t, heads, dim, generator=g).to(torch.bfloat16)
    k8 = quantize(torch.randn(kv_heads, s, dim, generator=g), 0.03, fp8)
    v8 = quantize(torch.randn(kv_heads, s, dim, generator=g), 0.2, fp8)
    got = prefill_attention_bf16(q, k8, v8, dim**-0.5, True, 0.03, 0.2)
    k, v = dequantize(k8, 0.03, torch.bfloat16), dequantize(v8, 0.2, torch.bfloat16)
    want = prefill_attention_ref(q, k, v, dim**-0.5, True)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(got, prefill_attention_bf16(q, k, v, dim**-0.5, True))


@pytest.mark.usefixtures("bf16_prefill")
def test_bf16_prefill_kernel_refuses_bad_shapes_with_a_message():
    q = torch.randn(8, 9, 64).to(torch.bfloat16)
    k = torch.randn(3, 8, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="T <= S"):
        prefill_attention_bf16(q, k[:, :4].contiguous(), k[:, :4].contiguous(), 0.125)
    with pytest.raises(RuntimeError, match="bf16"):
        prefill_attention_bf16(q.float(), k, k, 0.125)
    q48, k48 = q[..., :48].contiguous(), k[..., :48].contiguous()
    with pytest.raises(RuntimeError, match="32, 64 or 128"):
        prefill_attention_bf16(q48, k48, k48, 0.125)


def test_kernel_refuses_bad_shapes_with_a_message():
    q, k, v, tables, ctx = _case(2, 9, 3, 64, 16, [5, 9], torch.float32)
    with pytest.raises(RuntimeError, match="context_lens out of"):
        paged_decode_attention(q, k, v, tables, torch.tensor([5, 10_000]), 0.125)
    with pytest.raises(RuntimeError, match="multiple of num_kv_heads"):
        paged_decode_attention(q[:, :8].contiguous(), k, v, tables, ctx, 0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(1, 576), (32, 576), (2048, 64), (5, 100)])
def test_rms_norm_matches_hugging_face(rows, hidden, dtype):
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, hidden, generator=g) * 3).to(dtype)
    weight = torch.randn(hidden, generator=g).to(dtype)
    want = rms_norm_ref(x, weight, 1e-5)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), want, **tol)
    residual = torch.randn(rows, hidden, generator=g).to(dtype)
    summed = residual + x
    got = add_rms_norm(residual, x, weight, 1e-5)
    assert torch.equal(residual, summed)  # added in place, rounded as torch's add
    torch.testing.assert_close(got, rms_norm_ref(summed, weight, 1e-5), **tol)


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_kept(tmp_path):
    lock = tmp_path / "lock"
    assert not clear_stale_lock(tmp_path)  # none
    lock.touch()
    assert not clear_stale_lock(tmp_path) and lock.exists()  # a build in progress
    old = time.time() - STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    assert clear_stale_lock(tmp_path) and not lock.exists()
