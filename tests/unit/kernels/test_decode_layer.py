"""A decoder layer at a few decode rows in one C++ call (`decode_layer`) against the module's
own forward, op by op: the same bits out, the same bits in the cache; and the cases that must
keep the op-by-op path."""

from __future__ import annotations

import os

import pytest
import torch

from tandem.engine.attention import build_attn_metadata
from tandem.engine.models import llama
from tandem.engine.models.layers import rope_cos_sin
from tandem.kernels import cpu as cpu_kernels

pytestmark = pytest.mark.skipif(
    os.environ.get("TANDEM_CPU_KERNELS") == "0", reason="CPU kernels switched off"
)

HEADS, KV_HEADS, DIM, BS = 6, 2, 64, 4


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    assert cpu_kernels.load_cpu_kernels(), "the CPU kernels did not build (see the log)"


def _layer(dtype, qkv_bias: bool) -> llama.DecoderLayer:
    cfg = {"vocab_size": 64, "hidden_size": HEADS * DIM, "intermediate_size": 320,
           "num_hidden_layers": 1, "num_attention_heads": HEADS,
           "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-5}  # fmt: skip
    torch.manual_seed(0)
    layer = llama.DecoderLayer(llama.LlamaArgs.from_hf(cfg, qkv_bias))
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    layer = layer.to(dtype)
    for m in layer.modules():
        if isinstance(m, llama.Linear):
            m.prepare()
    return layer


def _inputs(dtype, ctx: list[int], num_blocks=200):
    g = torch.Generator().manual_seed(1)
    k_cache = torch.randn(num_blocks, KV_HEADS, BS, DIM, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, KV_HEADS, BS, DIM, generator=g).to(dtype)
    free = iter(torch.randperm(num_blocks, generator=g).tolist())
    tables = [[next(free) for _ in range(-(-c // BS))] for c in ctx]
    meta = build_attn_metadata([1] * len(ctx), ctx, tables, BS, torch.device("cpu"))
    cos, sin = rope_cos_sin(DIM, 10000.0, None, 512)
    positions = torch.tensor([c - 1 for c in ctx])
    cos, sin = (t[positions].to(dtype).unsqueeze(1) for t in (cos, sin))
    x = torch.randn(len(ctx), HEADS * DIM, generator=g).to(dtype)
    return x, cos, sin, k_cache, v_cache, meta


def _run(layer, dtype, ctx, monkeypatch, op_by_op: bool = False):
    """(output, k_cache, v_cache), and whether the one call ran."""
    x, cos, sin, k_cache, v_cache, meta = _inputs(dtype, ctx)
    calls = []
    real = llama.decode_layer
    monkeypatch.setattr(llama, "decode_layer", lambda *a: calls.append(1) or real(*a))
    if op_by_op:
        monkeypatch.setattr(llama.DecoderLayer, "row_weights", lambda self: None)
    with torch.no_grad():
        out = layer(x, cos, sin, meta, k_cache, v_cache)
    monkeypatch.undo()
    return (out, k_cache, v_cache), bool(calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ctx", [[37], [5, 9, 150, 1]], ids=["one row", "four rows, 3 groups"])
@pytest.mark.parametrize("qkv_bias", [False, True], ids=["llama", "qwen2"])
def test_one_call_gives_the_op_by_op_bits(dtype, ctx, qkv_bias, monkeypatch):
    layer = _layer(dtype, qkv_bias)
    want, called = _run(layer, dtype, ctx, monkeypatch, op_by_op=True)
    assert not called
    got, called = _run(layer, dtype, ctx, monkeypatch)
    assert called
    for g, w in zip(got, want):
        assert g.dtype == dtype and torch.equal(g, w)


def test_what_the_call_cannot_do_keeps_the_op_by_op_path(monkeypatch):
    layer = _layer(torch.float32, False)
    assert layer.row_weights() is not None
    layer.self_attn.kv_amax = [0.0, 0.0]  # KV-scale calibration records maxima
    assert layer.row_weights() is None
    layer.self_attn.kv_amax = None
    layer.mlp.down_proj.weight_rows = None  # no row form (CUDA; a dtype it lacks)
    assert layer.row_weights() is None
    layer = _layer(torch.float32, False)
    layer.self_attn.o_proj.bias = torch.nn.Parameter(torch.zeros(HEADS * DIM))
    assert layer.row_weights() is None
    layer = _layer(torch.float32, False)
    _, called = _run(layer, torch.float32, [3, 4, 5, 6, 7], monkeypatch)
    assert not called  # 5 rows: past the kernel's 4


def test_a_lora_wrapped_projection_keeps_the_op_by_op_path():
    layer = _layer(torch.float32, False)

    class Wrapped(torch.nn.Module):  # what LoRALinear is to the check: not a plain Linear
        def __init__(self, base):
            super().__init__()
            self.base, self.weight_rows, self.bias = base, base.weight_rows, None

    layer.mlp.gate_up_proj = Wrapped(layer.mlp.gate_up_proj)
    assert layer.row_weights() is None
