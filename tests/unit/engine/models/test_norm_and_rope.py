"""RMSNorm and RoPE as the models use them: both RMSNorm paths (the C++ kernel, torch's)
against Hugging Face's, and RoPE's signed-sin rotation against HF's rotate_half, bit for
bit in fp32."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.models import layers
from tandem.engine.models.layers import RMSNorm, apply_rope, rope_cos_sin
from tandem.kernels.cpu import rms_norm_ref


@pytest.fixture(params=["kernel", "torch"])
def norm_path(request, monkeypatch):
    """Each RMSNorm path in turn: the C++ kernel where it is built, torch's elsewhere."""
    if request.param == "kernel":
        if not layers.load_cpu_kernels():
            pytest.skip("CPU kernels not built")
    else:
        monkeypatch.setattr(layers, "load_cpu_kernels", lambda: False)
    return request.param


def _norm(hidden: int, eps: float = 1e-5) -> RMSNorm:
    norm = RMSNorm(hidden, eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=torch.Generator().manual_seed(1)))
    return norm


@pytest.mark.parametrize("rows,hidden", [(1, 64), (17, 100)])
def test_rms_norm_matches_hugging_face_on_either_path(norm_path, rows, hidden):
    norm = _norm(hidden)
    x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(rows)) * 3
    with torch.inference_mode():
        got = norm(x)
    torch.testing.assert_close(got, rms_norm_ref(x, norm.weight.detach(), 1e-5))


def test_add_and_norm_adds_into_the_residual_and_normalizes_the_sum(norm_path):
    norm = _norm(64)
    g = torch.Generator().manual_seed(2)
    residual, x = torch.randn(5, 64, generator=g), torch.randn(5, 64, generator=g)
    summed = residual + x
    with torch.inference_mode():
        got = norm.add_and_norm(residual, x)
    assert torch.equal(residual, summed)
    torch.testing.assert_close(got, rms_norm_ref(summed, norm.weight.detach(), 1e-5))


def _hf_rope(x, cos, sin):
    """Hugging Face's apply_rotary_pos_emb for one tensor: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
    ids=["default", "linear", "llama3"],
)
def test_rope_rotates_as_hugging_face_bit_for_bit(scaling):
    head_dim, max_len = 16, 256
    cos, signed_sin = rope_cos_sin(head_dim, 10000.0, scaling, max_len)
    assert cos.shape == signed_sin.shape == (max_len, head_dim)
    half = head_dim // 2
    sin = torch.cat((-signed_sin[:, :half], signed_sin[:, half:]), dim=-1)
    assert torch.equal(sin[:, :half], sin[:, half:])  # HF's table: the halves repeat
    positions = torch.tensor([0, 3, 100, 255])
    x = torch.randn(4, 6, head_dim, generator=torch.Generator().manual_seed(3))  # (T, heads, D)
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # (T, 1, D)
    got = apply_rope(x, c, signed_sin[positions].unsqueeze(1))
    assert torch.equal(got, _hf_rope(x, c, s))


def test_rope_rejects_an_unknown_scaling():
    with pytest.raises(ValueError, match="unsupported rope_type"):
        rope_cos_sin(16, 10000.0, {"rope_type": "yarn", "factor": 4.0}, 8)
