"""The multi-LoRA triton kernels against LoRALinear's torch path: segments of one row
(decodes) and long ones (prefill chunks), several slots, one slot in two segments, base
rows left alone. Under `TRITON_INTERPRET=1` without a GPU (small shapes), for real with one."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
from torch import nn

ON_GPU = torch.cuda.is_available()
if not ON_GPU:  # decorated afresh, interpreted
    os.environ["TRITON_INTERPRET"] = "1"
    sys.modules.pop("tandem.kernels.triton_lora", None)
importlib.import_module("tandem.kernels.triton_lora")
from tandem.engine.lora.layers import LoRABatch, LoRALinear  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2}


def projection(dtype, shard_sizes=(40, 24, 24), fan_in=48, slots=3, rank=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(fan_in, sum(shard_sizes), bias=False).to(DEVICE, dtype)
    layer = LoRALinear(base, list(shard_sizes), fan_in, slots, rank, dtype, DEVICE)
    for slot in range(slots):  # ranks below the max, and one shard not targeted
        r = rank - slot
        shards = [(torch.randn(r, fan_in, generator=g), torch.randn(size, r, generator=g))
                  for size in shard_sizes]  # fmt: skip
        shards[slot % len(shards)] = None
        layer.set_slot(slot, [None if s is None else (s[0].to(dtype), s[1].to(dtype))
                              for s in shards])  # fmt: skip
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_segments_of_every_kind_match_the_torch_path(dtype):
    layer = projection(dtype)
    segments = [(0, 1, 0), (1, 2, 2), (2, 3, -1), (3, 4, 0),  # decode rows
                (4, 37, 1), (37, 45, -1), (45, 70, 0), (70, 71, 2)]  # fmt: skip
    x = torch.randn(71, 48, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    outs = {}
    for use_kernel in (False, True):
        layer.batch = LoRABatch.build(segments, DEVICE, use_kernel, 3, dtype)
        assert (layer.batch.kernel_args is not None) == use_kernel
        outs[use_kernel] = layer(x)
    layer.batch = None
    base = layer(x)
    torch.testing.assert_close(outs[True], outs[False], atol=TOLERANCE[dtype] * 10,
                               rtol=TOLERANCE[dtype])  # fmt: skip
    for start, end, slot in segments:
        changed = not torch.allclose(outs[True][start:end], base[start:end])
        assert changed == (slot >= 0), (start, slot)  # base rows untouched


def test_the_torch_path_is_the_lora_formula():
    layer = projection(torch.float32, shard_sizes=(16,), fan_in=12, slots=2, rank=4)
    a = torch.randn(3, 12, dtype=torch.float64)
    b = torch.randn(16, 3, dtype=torch.float64)
    layer.set_slot(1, [(a.float(), b.float())])
    x = torch.randn(5, 12)
    layer.batch = LoRABatch.build([(0, 2, -1), (2, 5, 1)], DEVICE, False, 2)
    y = layer(x.to(DEVICE)).cpu().double()
    expected = x.double() @ layer.base.weight.detach().cpu().double().t()
    expected[2:] += (x[2:].double() @ a.t()) @ b.t()
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
