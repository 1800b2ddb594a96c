import torch

from tandem.engine.request import SamplingParams
from tandem.engine.sampler import SamplingTensors, apply_top_k_top_p, sample


def _st(params, gens=None, vocab=8):
    return SamplingTensors.build(params, gens or [None] * len(params), vocab, torch.device("cpu"))


def test_top_k_and_top_p_keep_expected_sets():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]]))
    out = apply_top_k_top_p(logits.clone(), torch.tensor([2, 4]), torch.tensor([1.0, 0.65]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    assert torch.isfinite(out[1]).tolist() == [True, True, False, False]


def test_greedy_rows_take_argmax_and_min_p_filters():
    logits = torch.tensor([[0.0, 5.0, 1.0], [10.0, 0.0, 9.99]])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, min_p=0.99)]
    for _ in range(20):
        assert sample(logits, _st(params, vocab=3)).tolist()[0] == 1
        assert sample(logits, _st(params, vocab=3)).tolist()[1] in (0, 2)


def test_seeded_rows_do_not_depend_on_batch_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    seeded = SamplingParams(temperature=1.0, seed=123)
    alone = sample(logits[:1], _st([seeded], [torch.Generator().manual_seed(123)], 50))
    batch = sample(
        logits,
        _st(
            [seeded, SamplingParams(), SamplingParams(temperature=0.5)],
            [torch.Generator().manual_seed(123), None, None],
            50,
        ),
    )
    assert alone.tolist()[0] == batch.tolist()[0]


def test_greedy_ties_take_the_first_maximum_like_argmax():
    logits = torch.zeros(4, 4096)
    for row, cols in enumerate([(2, 5), (0, 4095), (17, 18, 3000), (4095,)]):
        logits[row, list(cols)] = 7.0
    got = sample(logits, _st([SamplingParams(temperature=0.0)] * 4, vocab=4096)).tolist()
    assert got == [2, 0, 17, 4095] == logits.argmax(dim=-1).tolist()
