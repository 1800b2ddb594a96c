"""Speculative decoding's pure parts: n-gram proposals, and the rejection sampler's
exactness (greedy: the target's argmax chain; random: the target's own distribution)."""

from __future__ import annotations

import numpy as np
import torch

from tandem.engine.config import SpeculativeConfig
from tandem.engine.spec_decode.ngram import propose_ngram
from tandem.engine.spec_decode.rejection import rejection_sample
from tandem.engine.spec_decode.suffix import SuffixProposer, speculate


def test_ngram_proposes_what_followed_the_latest_earlier_occurrence_of_the_longest_suffix():
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7, 2, 3, 4]
    # "2 3 4" occurs at 1 and 6; the latest (6) was followed by 6, 7, 2
    assert propose_ngram(tokens, 3, 1, 3) == [6, 7, 2]
    assert propose_ngram(tokens, 5, 1, 3) == [6, 7, 2, 3, 4]
    assert propose_ngram([5, 6, 7, 8], 4, 2, 4) == []  # the suffix occurs nowhere earlier
    assert propose_ngram([7, 1, 7], 2, 1, 2) == [1, 7]  # a 1-gram
    assert propose_ngram([7, 1, 7], 2, 2, 2) == []  # too short for 2-grams
    assert propose_ngram([4, 4, 4, 4], 3, 2, 3) == [4]  # the latest occurrence: one follows


def test_greedy_outputs_the_targets_argmax_chain():
    probs = torch.eye(5)[[2, 3, 1, 4]]  # argmax per position: 2, 3, 1, 4
    assert rejection_sample(probs, [2, 3, 1], greedy=True) == [2, 3, 1, 4]  # + bonus
    assert rejection_sample(probs, [2, 0, 1], greedy=True) == [2, 3]  # corrected at 1
    assert rejection_sample(probs[:1], [], greedy=True) == [2]


def chi_square_pvalue(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's test: P(chi2 with len - 1 degrees of freedom >= the statistic)."""
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token drawn that the target never gives"
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2.0))


def _draws(p: torch.Tensor, draft: list[int], n: int, draft_probs=None) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return [rejection_sample(p, draft, False, g, draft_probs) for _ in range(n)]


def test_random_first_tokens_follow_the_target_distribution():
    """Whatever is proposed, the first output token is distributed as p_1: a chi-square
    test over 20,000 draws at alpha = 1e-3 (a correct sampler fails it one run in 1,000,
    and the seed is fixed, so it either always passes or never)."""
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.1, 0.1, 0.2, 0.3, 0.3]])
    n = 20_000
    for draft in ([0], [3], [4]):
        first = torch.tensor([d[0] for d in _draws(p, draft, n)])
        counts = torch.bincount(first, minlength=5).double()
        assert chi_square_pvalue(counts, p[0].double() * n) > 1e-3, (draft, counts)


def test_random_accepted_runs_then_the_next_token_follow_the_target():
    """Two proposals: the second output token, given the first was the proposal, follows p_2
    (it is the second proposal's accept/correct or the bonus)."""
    p = torch.tensor([[0.6, 0.4, 0.0], [0.2, 0.3, 0.5], [0.7, 0.2, 0.1]])
    draws = _draws(p, [0, 2], 20_000)
    second = torch.tensor([d[1] for d in draws if d[0] == 0])
    counts = torch.bincount(second, minlength=3).double()
    expected = p[1] * len(second)
    assert chi_square_pvalue(counts, expected.double()) > 1e-3, counts
    assert all(len(d) <= 3 for d in draws)


def test_a_draft_models_proposals_are_corrected_to_the_target():
    """q is a distribution (a draft model's): the output still follows p."""
    p = torch.tensor([[0.1, 0.6, 0.3], [0.3, 0.3, 0.4]])
    q = torch.tensor([[0.7, 0.2, 0.1]])
    g = torch.Generator().manual_seed(7)
    firsts = []
    for _ in range(20_000):
        d = int(torch.multinomial(q[0], 1, generator=g))  # as the draft model samples
        firsts.append(rejection_sample(p, [d], False, g, q)[0])
    counts = torch.bincount(torch.tensor(firsts), minlength=3).double()
    assert chi_square_pvalue(counts, p[0].double() * 20_000) > 1e-3, counts


def test_the_chi_square_check_catches_a_sampler_that_accepts_too_often():
    """The same check, given a sampler that accepts a proposal without weighing it, fails:
    the test has the power to see the error it guards against."""
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    g = torch.Generator().manual_seed(5)
    firsts = [3 if torch.rand(1, generator=g) < 0.5 else int(torch.multinomial(p, 1, generator=g))
              for _ in range(20_000)]  # fmt: skip
    counts = torch.bincount(torch.tensor(firsts), minlength=5).double()
    assert chi_square_pvalue(counts, p.double() * 20_000) < 1e-6


def test_a_request_whose_proposals_keep_failing_stops_proposing_for_a_while():
    from tandem.engine.request import Request, SamplingParams
    from tandem.engine.spec_decode import proposer

    spec = proposer.SpecDecoding(
        SpeculativeConfig("ngram", 4, prompt_lookup_min=1, prompt_lookup_max=2)
    )
    r = Request("r", [1, 2, 3, 1, 2], SamplingParams(max_tokens=100))
    r.append_output_token(3)
    r.num_computed_tokens = r.num_tokens - 1
    spec.propose([r])
    assert r.spec_token_ids == [1, 2, 3]
    for _ in range(3):  # every proposal rejected
        spec.count({"r": [1, 2, 3]}, [r], [[9]])
    spec.propose([r])
    assert r.spec_token_ids == []  # backing off
    for _ in range(proposer.BACKOFF_STEPS):
        spec.propose([r])
    assert r.spec_token_ids == [1, 2, 3]  # tries again
    busy = proposer.SpecDecoding(
        SpeculativeConfig(
            "ngram", 4, prompt_lookup_min=1, prompt_lookup_max=2, disable_by_batch_size=1
        )
    )
    busy.propose([r, r])  # more running than disable_by_batch_size: none
    assert r.spec_token_ids == []


def _suffix(**overrides):

    fields = dict(method="suffix", num_speculative_tokens=8) | overrides
    return SuffixProposer(SpeculativeConfig(**fields))


def test_suffix_decoding_follows_the_most_frequent_continuation_of_the_longest_useful_match():
    s = _suffix()
    # "2 3 4" occurs twice before the end, followed once by 5 and once by 6: a tie goes to
    # the latest; each step's probability is 1/2 then 1; the match is 3 long (factor 1.0)
    assert s._one([1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7, 2, 3, 4]) == [6, 7, 2]
    # a 3-token match allows 3 tokens; twice the factor, 6 (where the context runs out)
    assert _suffix(suffix_decoding_max_spec_factor=2.0)._one([1, 2, 3, 4, 5, 6, 1, 2, 3]) == [
        4, 5, 6, 1, 2, 3]  # fmt: skip
    # match and proposal together within the tree's depth
    assert _suffix(suffix_decoding_max_tree_depth=4)._one([1, 2, 3, 4, 5, 6, 1, 2, 3]) == [4]
    # after "5": 8 three times in four (3/4), then 9, 5 (3/4 still), then 8 twice in three
    # (1/2): each token's probability is its count over the matched places
    source = np.array([5, 8, 9, 5, 8, 9, 5, 8, 9, 5, 7, 1])
    ends, pattern = np.array([0, 3, 6, 9]), np.array([5])

    def proposal(min_prob):
        c = SpeculativeConfig("suffix", 8, suffix_decoding_max_spec_factor=8.0,
                              suffix_decoding_min_token_prob=min_prob)  # fmt: skip
        return speculate(source, ends, pattern, 8, c)

    assert proposal(0.6) == ([8, 9, 5], 2.25)
    assert proposal(0.4)[0] == [8, 9, 5, 8, 9, 5]
    assert proposal(0.8) == ([], 0.0)
    assert _suffix()._one([1, 2, 3]) == []  # the last token occurs nowhere earlier


def test_suffix_decoding_searches_earlier_responses_and_evicts_the_oldest():
    from types import SimpleNamespace

    s = _suffix(suffix_decoding_max_cached_requests=2)

    def finished(*outputs):
        s.finish([SimpleNamespace(output_token_ids=list(o)) for o in outputs])

    finished([10, 11, 12, 13, 14])
    assert s._one([50, 51, 10, 11]) == [12, 13]  # a 2-token match: 2 tokens
    finished([20, 21, 22], [30, 31, 32])  # the first response is evicted
    assert s._one([50, 51, 10, 11]) == []
    assert s._one([40, 20, 21]) == [22]  # a separator ends a response's continuation
    for i in range(300):  # the buffer compacts and grows; the latest two stay searchable
        finished(range(100 + i, 110 + i))
    assert s._one([1, 399, 400, 401]) == [402, 403, 404]
    assert s._one([1, 20, 21]) == []
    assert _suffix(suffix_decoding_max_cached_requests=0).responses.tokens.size == 0


def test_the_speculative_config_takes_vllms_json():
    import pytest

    c = SpeculativeConfig.from_dict({"method": "suffix"})
    assert c.num_speculative_tokens == 24  # the tree's depth, as vLLM
    c = SpeculativeConfig.from_dict({"model": "/draft", "num_speculative_tokens": 3})
    assert c.method == "draft_model"
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig.from_dict({"model": "/draft"})
    with pytest.raises(ValueError, match="not supported"):
        SpeculativeConfig.from_dict({"method": "eagle", "model": "/head"})
    with pytest.raises(ValueError, match="unknown"):
        SpeculativeConfig.from_dict({"method": "ngram", "lookahead": 3})
