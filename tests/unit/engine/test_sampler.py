import torch

from tandem.engine.request import Request, SamplingParams
from tandem.engine.sampler import SamplingTensors, apply_top_k_top_p
from tandem.engine.sampler import sample as sample_with_logprobs


def _st(params, gens=None, vocab=8, prompts=None, outputs=None):
    requests = [
        Request(
            f"r{i}",
            prompts[i] if prompts else [0],
            p,
            eos_token_id=1,
            output_token_ids=outputs[i] if outputs else [],
        )
        for i, p in enumerate(params)
    ]
    return SamplingTensors.build(requests, gens or [None] * len(params), vocab, torch.device("cpu"))


def sample(logits, st):
    return sample_with_logprobs(logits, st)[0]


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


# -- penalties, bans and biases against a plain reference ------------------------------------


def _reference(logits: list[float], p: SamplingParams, prompt, output, eos=1) -> list[float]:
    """vLLM's semantics, one row, in plain Python."""
    out = list(logits)
    if p.allowed_token_ids is not None:
        out = [x if t in p.allowed_token_ids else float("-inf") for t, x in enumerate(out)]
    for word in p.bad_words_token_ids:
        if len(word) == 1 or tuple(output[-(len(word) - 1) :]) == tuple(word[:-1]):
            out[word[-1]] = float("-inf")
    if len(output) < p.min_tokens:
        for t in [*p.stop_token_ids, *([] if p.ignore_eos else [eos])]:
            out[t] = float("-inf")
    for t, b in p.logit_bias:
        out[t] += b
    for t in range(len(out)):
        if t in prompt or t in output:
            r = p.repetition_penalty
            out[t] = out[t] / r if out[t] > 0 else out[t] * r
        count = output.count(t)
        out[t] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    return out


CASES = [
    SamplingParams(temperature=0, repetition_penalty=1.7),
    SamplingParams(temperature=0, repetition_penalty=0.6),
    SamplingParams(temperature=0, frequency_penalty=0.9),
    SamplingParams(temperature=0, presence_penalty=-1.3),
    SamplingParams(
        temperature=0, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.2
    ),  # fmt: skip
    SamplingParams(temperature=0, logit_bias={3: 5.0, 7: -100.0}),
    SamplingParams(temperature=0, allowed_token_ids=[2, 4, 6]),
    SamplingParams(temperature=0, bad_words_token_ids=[(5,), (3, 4, 9), (0, 8)]),
    SamplingParams(temperature=0, min_tokens=5, stop_token_ids=[6]),
    SamplingParams(temperature=0, min_tokens=5, ignore_eos=True, max_tokens=8),
    SamplingParams(temperature=0),
]


def test_each_penalty_ban_and_bias_matches_the_reference_in_one_batch():
    from tandem.engine.sampler import process_logits

    torch.manual_seed(3)
    vocab = 10
    logits = torch.randn(len(CASES), vocab) * 3
    prompts = [[2, 3, 3, 7]] * len(CASES)
    outputs = [[3, 4, 4, 9, 0]] * len(CASES)
    outputs[7] = [1, 3, 4]  # the bad word (3, 4, 9) is one token from completion
    st = _st(CASES, vocab=vocab, prompts=prompts, outputs=outputs)
    got = process_logits(logits.clone(), st)
    for i, p in enumerate(CASES):
        want = _reference(logits[i].tolist(), p, prompts[i], outputs[i])
        assert torch.allclose(got[i], torch.tensor(want), atol=1e-5), (i, p)
    # the greedy choice follows the processed logits
    ids = sample(logits.clone(), st)
    assert ids.tolist() == got.argmax(dim=-1).tolist()


def test_min_tokens_bans_eos_and_stop_tokens_only_until_reached():
    logits = torch.zeros(2, 8)
    logits[:, 1] = 10.0  # EOS (id 1) is by far the most likely
    p = SamplingParams(temperature=0, min_tokens=3)
    before = _st([p, p], vocab=8, outputs=[[5, 5], [5, 5, 5]])
    assert sample(logits.clone(), before).tolist() == [0, 1]


def test_logprobs_raw_and_processed():
    from tandem.engine.sampler import LogprobsMode

    torch.manual_seed(0)
    logits = torch.randn(2, 30)
    params = [SamplingParams(temperature=0, logprobs=3, logit_bias={5: 50.0}),
              SamplingParams(temperature=0)]  # fmt: skip
    st = _st(params, vocab=30)
    ids, lps = sample_with_logprobs(logits.clone(), st, LogprobsMode.RAW_LOGPROBS)
    assert ids.tolist()[0] == 5 and lps[1] is None
    raw = logits[0].log_softmax(-1)
    lp = lps[0]
    assert lp.token_id == 5 and abs(lp.logprob - raw[5].item()) < 1e-6
    assert lp.rank == int((raw > raw[5]).sum()) + 1
    assert lp.top_ids == raw.topk(3).indices.tolist()
    assert torch.allclose(torch.tensor(lp.top_logprobs), raw.topk(3).values)
    _, lps = sample_with_logprobs(logits.clone(), _st(params, vocab=30),
                                  LogprobsMode.PROCESSED_LOGPROBS)  # fmt: skip
    assert lps[0].rank == 1 and lps[0].top_ids[0] == 5 and lps[0].logprob > -1e-3
    _, lps = sample_with_logprobs(logits.clone(), _st(params, vocab=30), LogprobsMode.RAW_LOGITS)
    assert abs(lps[0].logprob - logits[0, 5].item()) < 1e-6


def test_out_of_range_parameters_name_themselves():
    import pytest

    bad = {
        "presence_penalty": dict(presence_penalty=2.5),
        "frequency_penalty": dict(frequency_penalty=-3),
        "repetition_penalty": dict(repetition_penalty=0),
        "logit_bias": dict(logit_bias={1: 101}),
        "allowed_token_ids": dict(allowed_token_ids=[]),
        "logprobs": dict(logprobs=21),
        "prompt_logprobs": dict(prompt_logprobs=-1),
        "top_k": dict(top_k=-2),
        "min_p": dict(min_p=1.5),
    }
    for name, kwargs in bad.items():
        with pytest.raises(ValueError, match=f"^{name} must"):
            SamplingParams(**kwargs)
    p = SamplingParams(logit_bias={40: 1.0})
    with pytest.raises(ValueError, match="^logit_bias must"):
        p.check_vocab(32)


def test_top_k_fast_path_draws_what_the_full_path_draws():
    from tandem.engine.sampler import _sample_full, _sample_top_k

    torch.manual_seed(0)
    scaled = torch.randn(6, 1000) * 2
    top_k = torch.tensor([1, 5, 50, 50, 200, 999])
    top_p = torch.tensor([1.0, 0.9, 0.5, 1.0, 0.95, 0.8])
    min_p = torch.tensor([0.0, 0.0, 0.1, 0.0, 0.05, 0.0])
    for seed in range(30):
        gens = [torch.Generator().manual_seed(seed * 10 + i) for i in range(6)]
        fast, _ = _sample_top_k(scaled, top_k, top_p, min_p, gens)
        gens = [torch.Generator().manual_seed(seed * 10 + i) for i in range(6)]
        full, _ = _sample_full(scaled, top_k, top_p, min_p, gens)
        assert fast.tolist() == full.tolist()
    # unseeded: only top-k candidates are ever drawn
    for _ in range(20):
        got, _ = _sample_top_k(scaled, top_k, top_p, min_p, [None] * 6)
        for row, token in enumerate(got.tolist()):
            assert token in scaled[row].topk(int(top_k[row])).indices.tolist()


def test_top_p_candidates_path_draws_what_the_full_path_draws(monkeypatch):
    import tandem.engine.sampler as sampler

    monkeypatch.setattr(sampler, "TOP_P_CANDIDATES", 64)
    torch.manual_seed(1)
    peaked = torch.randn(3, 2000) * 6  # top 64 hold most of the mass
    flat = torch.randn(2, 2000) * 0.1  # they do not: these rows take the full path
    scaled = torch.cat([peaked, flat])
    top_p = torch.tensor([0.9, 0.5, 0.99, 0.9, 0.5])
    min_p = torch.tensor([0.0, 0.0, 0.01, 0.0, 0.0])
    for seed in range(25):
        gens = [torch.Generator().manual_seed(seed * 7 + i) for i in range(5)]
        got, _ = sampler._sample_top_p(scaled, None, top_p, min_p, gens)
        gens = [torch.Generator().manual_seed(seed * 7 + i) for i in range(5)]
        want, _ = sampler._sample_full(scaled, None, top_p, min_p, gens)
        assert got.tolist() == want.tolist()


def test_a_grammar_bitmask_bans_first_and_raw_logprobs_stay_the_models():
    from tandem.engine.sampler import LogprobsMode

    torch.manual_seed(1)
    logits = torch.randn(2, 40)
    allowed = [7, 33]  # row 0's grammar allows these two tokens only; row 1 is free
    bitmask = torch.zeros(1, 2, dtype=torch.int32)
    for t in allowed:
        bitmask[0, t // 32] |= 1 << (t % 32)
    params = [SamplingParams(temperature=1.0, seed=4, logprobs=2, logit_bias={9: 100.0}),
              SamplingParams(temperature=0, logprobs=2)]  # fmt: skip

    def run(mode):
        st = _st(params, gens=[torch.Generator().manual_seed(4), None], vocab=40)
        st.grammar = (torch.tensor([0]), bitmask)
        return sample_with_logprobs(logits.clone(), st, mode)

    ids, raw = run(LogprobsMode.RAW_LOGPROBS)
    assert ids[0].item() in allowed  # the bias on a banned token cannot bring it back
    assert ids[1].item() == logits[1].argmax().item()
    full = logits[0].log_softmax(-1)
    assert abs(raw[0].logprob - full[ids[0]].item()) < 1e-6  # the model's own distribution
    _, processed = run(LogprobsMode.PROCESSED_LOGPROBS)
    assert set(processed[0].top_ids) == set(allowed)
    assert abs(sum(torch.tensor(processed[0].top_logprobs).exp().tolist()) - 1) < 1e-5
