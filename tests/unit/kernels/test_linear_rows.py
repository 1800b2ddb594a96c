"""The C++ linear layer for decode's few rows (`linear_rows`) against the formula in float64,
at every thread count, and the Linear layer's choice of it."""

from __future__ import annotations

import os

import pytest
import torch

from tandem.engine.models.layers import Linear
from tandem.kernels import cpu as cpu_kernels

pytestmark = pytest.mark.skipif(
    os.environ.get("TANDEM_CPU_KERNELS") == "0", reason="CPU kernels switched off"
)


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    assert cpu_kernels.load_cpu_kernels(), "the CPU kernels did not build (see the log)"


TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def reference(x, w, b):
    """In float64 from the same (rounded) inputs; the kernel's one rounding is to x's dtype."""
    y = x.double() @ w.double().t()
    return y if b is None else y + b.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("out_features,in_features", [(96, 64), (37, 19), (5, 1000), (258, 576)])
def test_kernel_matches_the_formula(dtype, rows, out_features, in_features):
    """Fan-ins that are not a multiple of the vector width, output counts that are not a
    multiple of the tile, with and without a bias."""
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    w = torch.randn(out_features, in_features, generator=g).to(dtype)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    for b in (None, torch.randn(out_features, generator=g).to(dtype)):
        y = cpu_kernels.linear_rows(x, w, b)
        assert y.dtype == dtype and y.shape == (rows, out_features)
        want = reference(x, w, b)
        scale = want.abs().max().item()
        assert (y.double() - want).abs().max().item() <= TOLERANCE[dtype] * scale


def test_every_thread_count_gives_the_same_bits():
    """Each output is one thread's sum in a fixed order: lending a decode worker more threads
    changes no token."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3000, 576, generator=g)
    x = torch.randn(3, 576, generator=g)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(cpu_kernels.linear_rows(x, w, None))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_the_kernel_refuses_bad_shapes_with_a_message():
    w = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="1 to 4 rows"):
        cpu_kernels.linear_rows(torch.randn(5, 16), w, None)
    with pytest.raises(RuntimeError, match=r"\(rows, in\)"):
        cpu_kernels.linear_rows(torch.randn(2, 15), w, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu_kernels.linear_rows(torch.randn(2, 8), w.t(), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_runs_up_to_four_rows_in_the_kernel_and_more_in_torch(dtype, monkeypatch):
    g = torch.Generator().manual_seed(9)
    layer = Linear(64, 48, bias=True)
    layer.weight.data.copy_(torch.randn(48, 64, generator=g))
    layer.bias.data.copy_(torch.randn(48, generator=g))
    layer = layer.to(dtype)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer.prepare()
    assert layer.weight_rows is not None and torch.equal(layer.weight_rows, weight)
    calls = []
    kernel = cpu_kernels.linear_rows
    monkeypatch.setattr(cpu_kernels, "linear_rows", lambda *a: calls.append(1) or kernel(*a))
    for rows in (1, 4, 5, 16):
        calls.clear()
        x = torch.randn(rows, 64, generator=g).to(dtype)
        y = layer(x)
        assert calls == ([1] if rows <= cpu_kernels.LINEAR_MAX_ROWS else [])
        want = reference(x, weight, bias)
        assert (y.double() - want).abs().max().item() <= 2 * TOLERANCE[dtype] * want.abs().max()
