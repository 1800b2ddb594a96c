"""A model's decoder layers at a few decode rows in one C++ call (`decode_layers`, through
`LlamaForCausalLM.stack_rows`) against the modules' own forward, op by op: the same bits out,
the same bits in every cache; and the cases that must keep the module path."""

from __future__ import annotations

import os

import pytest
import torch

from tandem.engine.attention import build_attn_metadata
from tandem.engine.models import llama

pytestmark = pytest.mark.skipif(
    os.environ.get("TANDEM_CPU_KERNELS") == "0", reason="CPU kernels switched off"
)

HEADS, KV_HEADS, DIM, BS, LAYERS = 6, 2, 64, 4, 2


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    from tandem.kernels import cpu as cpu_kernels

    assert cpu_kernels.load_cpu_kernels(), "the CPU kernels did not build (see the log)"


def _model(dtype, qkv_bias: bool = False) -> llama.LlamaForCausalLM:
    cls = llama.Qwen2ForCausalLM if qkv_bias else llama.LlamaForCausalLM
    cfg = {"vocab_size": 64, "hidden_size": HEADS * DIM, "intermediate_size": 320,
           "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
           "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-5}  # fmt: skip
    torch.manual_seed(0)
    model = cls(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    model = model.to(dtype)
    for m in model.modules():
        if isinstance(m, llama.Linear):
            m.prepare()
    return model


def _caches(dtype, num_blocks=200):
    g = torch.Generator().manual_seed(1)
    shape = (num_blocks, KV_HEADS, BS, DIM)
    return [
        (torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype))
        for _ in range(LAYERS)
    ]


def _run(model, caches, ctx: list[int], monkeypatch):
    """The forward's hidden states over a decode batch at context lengths `ctx`, and whether
    the one call ran."""
    g = torch.Generator().manual_seed(2)
    free = iter(torch.randperm(caches[0][0].shape[0], generator=g).tolist())
    tables = [[next(free) for _ in range(-(-c // BS))] for c in ctx]
    meta = build_attn_metadata([1] * len(ctx), ctx, tables, BS, torch.device("cpu"))
    ids = torch.randint(0, 64, (len(ctx),), generator=g)
    calls = []
    real = llama.decode_layers
    monkeypatch.setattr(llama, "decode_layers", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        out = model(ids, torch.tensor([c - 1 for c in ctx]), meta, caches)
    monkeypatch.undo()
    return out, bool(calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ctx", [[37], [5, 9, 150, 1]], ids=["one row", "four rows, 3 groups"])
@pytest.mark.parametrize("qkv_bias", [False, True], ids=["llama", "qwen2"])
def test_one_call_gives_the_module_paths_bits(dtype, ctx, qkv_bias, monkeypatch):
    model = _model(dtype, qkv_bias)
    want_caches = _caches(dtype)
    want, called = _run(model, want_caches, ctx, monkeypatch)
    assert not called  # no stack yet
    caches = _caches(dtype)
    assert model.stack_rows(caches)
    assert len(model.row_stack.qkv_biases) == (LAYERS if qkv_bias else 0)
    got, called = _run(model, caches, ctx, monkeypatch)
    assert called and got.dtype == dtype and torch.equal(got, want)
    for (k, v), (wk, wv) in zip(caches, want_caches):
        assert torch.equal(k, wk) and torch.equal(v, wv)


def test_what_the_call_cannot_do_keeps_the_module_path(monkeypatch):
    model = _model(torch.float32)
    caches = _caches(torch.float32)
    assert model.stack_rows(caches)
    _, called = _run(model, caches, [3, 4, 5, 6, 7], monkeypatch)
    assert not called  # 5 rows: past the kernel's 4
    _, called = _run(model, _caches(torch.float32), [9], monkeypatch)
    assert not called  # caches other than the stacked ones
    model.layers[1].mlp.down_proj.weight_rows = None  # no row form (CUDA; a dtype it lacks)
    assert not model.stack_rows(caches) and model.row_stack is None
    _, called = _run(model, caches, [9], monkeypatch)
    assert not called
    model = _model(torch.float32)
    model.layers[0].self_attn.o_proj.bias = torch.nn.Parameter(torch.zeros(HEADS * DIM))
    assert not model.stack_rows(caches)


def test_a_lora_wrapped_projection_keeps_the_module_path():
    model = _model(torch.float32)

    class Wrapped(torch.nn.Module):  # what LoRALinear is to the check: not a plain Linear
        def __init__(self, base):
            super().__init__()
            self.base, self.weight_rows, self.bias = base, base.weight_rows, None

    model.layers[1].mlp.gate_up_proj = Wrapped(model.layers[1].mlp.gate_up_proj)
    assert not model.stack_rows(_caches(torch.float32))
