"""A step's verification of proposals: each decode that proposed k tokens ran k + 1
positions (its last token and the proposals), and each position is sampled as its own step
would have been: a structured output's grammar (in the state the proposals before it would
have left it), bans, biases, penalties and logits processors see the output as it would
stand there (the proposals before it appended), then temperature, top-k, top-p and min-p.
The rejection sampler (rejection.py) then keeps the longest accepted run and one token more.
"""

from __future__ import annotations

import dataclasses

import torch

from tandem.engine.request import Request
from tandem.engine.sampler import (
    LogprobsMode,
    SamplingTensors,
    TokenLogprobs,
    _min_p,
    apply_top_k_top_p,
    gather_logprobs,
    process_logits,
)
from tandem.engine.spec_decode.rejection import rejection_sample


def position_views(request: Request, proposals: list[int]) -> list[Request]:
    """The request as each verified position sees it: its output with the proposals before
    that position appended (a copy; the request itself is untouched)."""
    views = [request]
    for j in range(1, len(proposals) + 1):
        out = request.output_token_ids + proposals[:j]
        views.append(dataclasses.replace(request, output_token_ids=out, block_hashes=[]))
    return views


def verify(
    logits: torch.Tensor,  # (sum of k_i + 1, V) fp32, each request's rows in order
    requests: list[Request],
    proposals: list[list[int]],
    generators: list[torch.Generator | None],
    vocab_size: int,
    logits_processors: list,
    mode: LogprobsMode,
    grammars=None,  # the worker's GrammarManager: structured outputs mask every position
) -> list[tuple[list[int], list[TokenLogprobs] | None]]:
    """Per request: the tokens its step outputs, and their logprobs where asked."""
    views, gens = [], []
    for request, drafts, gen in zip(requests, proposals, generators):
        views += position_views(request, drafts)
        gens += [gen] * (len(drafts) + 1)
    st = SamplingTensors.build(views, gens, vocab_size, logits.device)
    st.processors = [(p, views) for p in logits_processors]
    masked = grammars.spec_bitmask(requests, proposals) if grammars is not None else None
    if masked is not None:
        st.grammar = (torch.tensor(masked[0], device=logits.device), masked[1])
    raw = logits.clone() if st.logprobs is not None else None
    processed = process_logits(logits, st)
    probs = None
    if not st.all_greedy:
        scaled = processed / st.temperature.unsqueeze(-1)
        scaled = apply_top_k_top_p(scaled, st.top_k, st.top_p)
        probs = _min_p(scaled.softmax(dim=-1), st.min_p)  # the sampler's own filter
        if st.min_p is not None:
            probs = probs / probs.sum(dim=-1, keepdim=True)
    results, row = [], 0
    for request, drafts, gen in zip(requests, proposals, generators):
        n = len(drafts) + 1
        greedy = request.sampling_params.greedy
        rows = processed[row : row + n] if greedy else probs[row : row + n]
        results.append((rejection_sample(rows, drafts, greedy, gen), row))
        row += n
    if st.logprobs is None:
        return [(tokens, None) for tokens, _ in results]
    source = raw if mode.name.startswith("RAW") else processed
    if mode in (LogprobsMode.RAW_LOGPROBS, LogprobsMode.PROCESSED_LOGPROBS):
        source = source.log_softmax(dim=-1)
    out = []
    for (tokens, first), request in zip(results, requests):
        k = request.sampling_params.logprobs
        if k is None:
            out.append((tokens, None))
            continue
        ids = torch.tensor(tokens, device=logits.device)
        out.append((tokens, gather_logprobs(source[first : first + len(tokens)], ids,
                                            [k] * len(tokens))))  # fmt: skip
    return out
