"""FP8 KV cache (`--kv-cache-dtype fp8 | fp8_e4m3 | fp8_e5m2`): what is stored and how.

The cache holds K / k_scale and V / v_scale as torch's float8 dtypes, cast with saturation
(a value past the format's largest finite one is stored as that one, never as NaN or inf).
Scales are per layer, K and V apart: from the checkpoint when it has them (`k_scale` /
`v_scale` tensors, as vLLM reads them), else measured at start-up on a fixed text with
`--calculate-kv-scales` (max |K| / 200 and max |V| / 100, vLLM's constants: headroom for
prompts that run hotter than the calibration), else 1.0. A reader multiplies back: scores
by k_scale (folded into the softmax scale), outputs by v_scale.

Every worker of a cluster measures on the same text, so their scales agree; a hand-off still
carries the sender's scales, and a receiver whose own differ re-quantizes what it gets.
"""

from __future__ import annotations

import re

import torch

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
FP8_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
              "fp8_e5m2": torch.float8_e5m2}  # fmt: skip
K_SCALE_CONSTANT = 200.0
V_SCALE_CONSTANT = 100.0
# A checkpoint's scale tensors: model.layers.3.self_attn.k_scale, ...k_proj.k_scale,
# ...attn.k_scale (the names vLLM's loaders accept).
SCALE_NAME = re.compile(r"layers\.(\d+)\..*\b([kv])_scale$")

CALIBRATION_TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable type "
    "made books cheap enough for merchants and students. Within fifty years, presses ran in "
    "more than two hundred cities. def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
    "        a, b = b, a + b\n    return a\n"
    "Q: What is 17 times 23? A: 391. The committee met on Tuesday, 4 March 2025, and agreed "
    "to publish its findings in English, Français and Deutsch."
)


def kv_torch_dtype(cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's element type: the model's for `auto`, else a float8."""
    if cache_dtype == "auto":
        return model_dtype
    return FP8_DTYPES[cache_dtype]


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A float8 tensor seen as uint8 (torch's CPU index_copy_, index_select and cat have no
    float8 kernels; moving bytes is the same thing); any other tensor as it is."""
    return t.view(torch.uint8) if is_fp8(t.dtype) else t


def quantize(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """x / scale as `dtype`, saturating at the format's largest finite value."""
    limit = torch.finfo(dtype).max
    y = x.float() if scale == 1.0 else x.float() / scale
    return y.clamp_(-limit, limit).to(dtype)


def dequantize(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    y = x.to(dtype)
    return y if scale == 1.0 else y.mul_(scale)


def requantize(tiles: torch.Tensor, sent: list[float], own: list[float]) -> torch.Tensor:
    """Blocks quantized with another worker's scales, (n, layers, 2, ...) -> with ours.
    `sent` and `own`: per layer, K's scale then V's."""
    out = torch.empty_like(tiles)
    for layer in range(tiles.shape[1]):
        for kv in range(2):
            i = 2 * layer + kv
            wide = dequantize(tiles[:, layer, kv], sent[i], torch.float32)
            out[:, layer, kv] = quantize(wide, own[i], tiles.dtype)
    return out


def calibrated_scale(amax: float, constant: float) -> float:
    """vLLM's calculate_kv_scales: max |x| over the calibration run / its constant."""
    return max(amax / constant, 1e-6)
