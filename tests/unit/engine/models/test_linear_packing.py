"""From how many rows a linear layer runs oneDNN's packed product is measured at load, per
weight shape: the packed form starts at the fewest rows from which it wins at every larger
row count, and is dropped where it never wins. Either way the layer computes x W^T + b."""

import pytest
import torch

from tandem.engine.models.layers import Linear, calibrate_packed

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")


def _linear(in_features: int, out_features: int, bias: bool = False) -> Linear:
    layer = Linear(in_features, out_features, bias)
    torch.nn.init.normal_(layer.weight)
    if bias:
        torch.nn.init.normal_(layer.bias)
    return layer


def _timer(packed_wins_from: dict[int, int | None]):
    """A clock where the packed product is faster from a row count on, per input width."""

    def timer(module: Linear, x: torch.Tensor, packed: bool) -> float:
        start = packed_wins_from[x.shape[1]]
        wins = start is not None and x.shape[0] >= start
        return 1.0 if packed == wins else 2.0

    return timer


@needs_onednn
def test_packed_form_starts_where_it_wins_and_is_dropped_where_it_never_does():
    a, b, c = _linear(16, 24), _linear(16, 24), _linear(32, 8)
    for layer in (a, b, c):
        layer.prepare()
    chosen = calibrate_packed([a, b, c], timer=_timer({16: 6, 32: None}))
    assert chosen == {(16, 24): 8, (32, 8): None}
    assert a.packed_from == b.packed_from == 8  # one shape, one measurement
    assert c.packed is None  # its memory is given back


@needs_onednn
def test_a_win_at_some_rows_but_not_at_more_does_not_count():
    layer = _linear(16, 24)
    layer.prepare()

    def timer(module, x, packed):  # packed wins at 1-16 rows only
        wins = x.shape[0] <= 16
        return 1.0 if packed == wins else 2.0

    assert calibrate_packed([layer], timer=timer) == {(16, 24): None}


@needs_onednn
def test_a_tie_at_more_rows_keeps_the_packed_form():
    layer = _linear(16, 24)
    layer.prepare()

    def timer(module, x, packed):  # packed 3% slower at 128 rows (noise), 2x faster below
        if x.shape[0] == 128:
            return 1.03 if packed else 1.0
        return 1.0 if packed else 2.0

    assert calibrate_packed([layer], timer=timer) == {(16, 24): 1}


@needs_onednn
def test_packed_bf16_computes_the_same_product():
    layer = _linear(40, 24, bias=True).to(torch.bfloat16)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer.prepare()
    if layer.packed is None:
        pytest.skip("this oneDNN has no packed bf16 product")
    x = torch.randn(17, 40).to(torch.bfloat16)
    want = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
    torch.testing.assert_close(layer.forward_packed(x).float(), want, rtol=2e-2, atol=5e-2)


@needs_onednn
@pytest.mark.parametrize("rows", [1, 2, 17, 32, 200])
def test_both_forms_compute_the_same_product(rows):
    layer = _linear(40, 24, bias=True)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer.prepare()
    layer.packed_from = 2
    x = torch.randn(rows, 40)
    want = torch.nn.functional.linear(x, weight, bias)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.forward_plain(x), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.forward_packed(x), want, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_calibration_on_the_clock_leaves_every_layer_correct():
    layers = [_linear(64, 96), _linear(96, 64, bias=True)]
    weights = [(layer.weight.detach().clone(), layer.bias) for layer in layers]
    for layer in layers:
        layer.prepare()
    chosen = calibrate_packed(layers, repeats=1)
    assert set(chosen) == {(64, 96), (96, 64)}
    for layer, (weight, bias) in zip(layers, weights):
        assert (layer.packed is None) == (chosen[tuple(layer.weight_t.shape)] is None)
        x = torch.randn(20, weight.shape[1])
        bias = None if bias is None else bias.detach()
        want = torch.nn.functional.linear(x, weight, bias)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-4)


def test_products_run_on_few_row_counts_and_rows_keep_their_results():
    """Above 64 rows a product runs on a rounded-up row count (oneDNN caches a kernel per
    row count it meets): a prefill's every count up to 2,048 reaches it as 116 counts, and
    each row's result is the one it gets alone."""
    from tandem.engine.models.layers import bucket_rows, in_row_buckets

    weight = torch.randn(48, 32)
    seen: set[int] = set()

    def product(x):
        seen.add(x.shape[0])
        return x @ weight.t()

    for rows in (*range(1, 300), 511, 512, 513, 1000, 2048):
        x = torch.randn(rows, 32)
        out = in_row_buckets(product, x)
        assert out.shape == (rows, 48)
        torch.testing.assert_close(out, x @ weight.t())
    assert {bucket_rows(r) for r in range(1, 2049)} == {
        *range(1, 65),
        *range(80, 513, 16),
        *range(576, 2049, 64),
    }
    assert len({bucket_rows(r) for r in range(1, 2049)}) == 116
    assert all(bucket_rows(r) - r <= (15 if r <= 512 else 63) for r in range(1, 4096))
    assert seen <= {bucket_rows(r) for r in range(1, 2049)}
