"""Batched sampling with vLLM V1's parameters and order, and logprobs.

Per step, on the rows that sample: (1) the raw logprobs, when asked for; (2) bans and
biases: a structured output's grammar, allowed_token_ids, bad words, EOS and stop tokens
before min_tokens, logit_bias; (3) penalties: repetition (prompt and output), frequency
and presence (output), then the global logits processors (logits_processors.py); then greedy
rows take the argmax and random rows apply temperature, top-k, top-p and min-p and sample
by Gumbel-max (argmax of probs / Exp(1) noise: no sync, no multinomial). A seeded request
draws its noise from its own generator, so its tokens do not depend on what else shares
the batch. Everything is a tensor operation over the batch; Python only lists which
(row, token) pairs a ban or a bias touches.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from tandem.engine.request import Request
from tandem.engine.structured_output.manager import apply_bitmask


class LogprobsMode(enum.Enum):
    """What `logprobs` report, as vLLM's --logprobs-mode: the model's raw distribution, or
    the one sampled from (after bans, biases, penalties, temperature, top-k/top-p)."""

    RAW_LOGPROBS = "raw_logprobs"
    PROCESSED_LOGPROBS = "processed_logprobs"
    RAW_LOGITS = "raw_logits"
    PROCESSED_LOGITS = "processed_logits"


# A row with top-p but no top-k is drawn from its likeliest TOP_P_CANDIDATES tokens when
# they hold its top-p mass (a full 49k-vocab sort of a batch of 32 costs ~180 ms here).
TOP_P_CANDIDATES = 1024


@dataclass(slots=True)
class TokenLogprobs:
    """One position's logprobs: the chosen token's, its rank (1 = most likely), and the
    top alternatives, most likely first."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass(slots=True)
class SamplingTensors:
    """Per-row sampling parameters of one step, as tensors on the model's device."""

    temperature: torch.Tensor  # (N,) float32; 1.0 on greedy rows (unused there)
    greedy: torch.Tensor  # (N,) bool
    top_k: torch.Tensor | None  # (N,) int64, vocab size where off; None when no row uses it
    top_p: torch.Tensor | None  # (N,) float32
    min_p: torch.Tensor | None  # (N,) float32
    generators: list[torch.Generator | None]
    all_greedy: bool
    any_greedy: bool
    random_rows: list[int] = field(default_factory=list)  # rows that sample at random
    top_k_rows: list[int] = field(default_factory=list)  # those of them with a top-k
    # (rows, token ids, values) added to the logits: biases, and -inf for every ban
    additive: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    allowed_rows: torch.Tensor | None = None  # rows restricted to allowed_token_ids
    allowed_mask: torch.Tensor | None = None  # (len(allowed_rows), vocab) bool
    penalties: _Penalties | None = None
    logprobs: list[int | None] | None = None  # per row: alternatives asked for (None: none)
    processors: list = field(default_factory=list)  # (global logits processor, requests)
    # structured outputs: (rows, int32 bitmask of their allowed tokens), see manager.py
    grammar: tuple[torch.Tensor, torch.Tensor] | None = None
    grammar_seconds: float = 0.0  # the time its application took (for /metrics)

    @classmethod
    def build(
        cls,
        requests: list[Request],
        generators: list[torch.Generator | None],
        vocab_size: int,
        device: torch.device,
    ) -> SamplingTensors:
        params = [r.sampling_params for r in requests]
        greedy = [p.greedy for p in params]
        t = [1.0 if g else p.temperature for p, g in zip(params, greedy)]
        k = [
            vocab_size if g or p.top_k <= 0 else min(p.top_k, vocab_size)
            for p, g in zip(params, greedy)
        ]
        tp = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
        mp = [0.0 if g else p.min_p for p, g in zip(params, greedy)]

        def opt(values, neutral, dtype):
            if all(v == neutral for v in values):
                return None
            return torch.tensor(values, dtype=dtype, device=device)

        st = cls(
            temperature=torch.tensor(t, dtype=torch.float32, device=device),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            top_k=opt(k, vocab_size, torch.int64),
            top_p=opt(tp, 1.0, torch.float32),
            min_p=opt(mp, 0.0, torch.float32),
            generators=generators,
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            random_rows=[i for i, g in enumerate(greedy) if not g],
            top_k_rows=[i for i, kk in enumerate(k) if kk < vocab_size],
        )
        st.additive = _additive(requests, device)
        allowed = [(i, p.allowed_token_ids) for i, p in enumerate(params) if p.allowed_token_ids]
        if allowed:
            st.allowed_rows = torch.tensor([i for i, _ in allowed], device=device)
            mask = torch.zeros(len(allowed), vocab_size, dtype=torch.bool, device=device)
            for j, (_, ids) in enumerate(allowed):
                mask[j, list(ids)] = True
            st.allowed_mask = mask
        if any(p.has_penalties for p in params):
            st.penalties = _Penalties.build(requests, vocab_size, device)
        if any(p.logprobs is not None for p in params):
            st.logprobs = [p.logprobs for p in params]
        return st


def _additive(requests: list[Request], device: torch.device):
    """(rows, ids, values) of every logit_bias entry and every ban of this step."""
    rows: list[int] = []
    ids: list[int] = []
    values: list[float] = []
    ban = float("-inf")
    for i, r in enumerate(requests):
        p = r.sampling_params
        for token_id, bias in p.logit_bias:
            rows.append(i), ids.append(token_id), values.append(bias)
        if r.num_output_tokens < p.min_tokens:  # no stop before min_tokens
            stops = list(p.stop_token_ids)
            if not p.ignore_eos and r.eos_token_id is not None:
                stops.append(r.eos_token_id)
            for token_id in stops:
                rows.append(i), ids.append(token_id), values.append(ban)
        for word in p.bad_words_token_ids:  # ban the token that would complete a bad word
            prefix = word[:-1]
            if not prefix or tuple(r.output_token_ids[-len(prefix) :]) == prefix:
                rows.append(i), ids.append(word[-1]), values.append(ban)
    if not rows:
        return None
    return (
        torch.tensor(rows, dtype=torch.int64, device=device),
        torch.tensor(ids, dtype=torch.int64, device=device),
        torch.tensor(values, dtype=torch.float32, device=device),
    )


@dataclass(slots=True)
class _Penalties:
    """Repetition, frequency and presence penalties of a batch, as vLLM applies them, on
    just the logits they touch: each row's tokens of its prompt and output (a few hundred)
    rather than the whole vocabulary (dense (rows, vocab) passes cost ~5x more here)."""

    keys: torch.Tensor  # (M,) row * vocab + token id of every (row, seen token) pair
    repetition: torch.Tensor  # (M,) the row's repetition penalty
    subtract: torch.Tensor  # (M,) frequency * count + presence * (count > 0)

    @classmethod
    def build(cls, requests: list[Request], vocab_size: int, device: torch.device) -> _Penalties:
        def keys(lists: list[list[int]]) -> torch.Tensor:
            flat = [i * vocab_size + t for i, x in enumerate(lists) for t in x]
            return torch.tensor(flat, dtype=torch.int64, device=device)

        out_keys, counts = keys([r.output_token_ids for r in requests]).unique(return_counts=True)
        seen = torch.cat((out_keys, keys([r.prompt_token_ids for r in requests]))).unique()
        count = torch.zeros(seen.shape, device=device)  # each seen token's count in the output
        if len(out_keys):
            pos = torch.searchsorted(out_keys, seen).clamp_(max=len(out_keys) - 1)
            count = torch.where(out_keys[pos] == seen, counts[pos], 0).float()
        params = [r.sampling_params for r in requests]

        def per_key(values):
            return torch.tensor(values, dtype=torch.float32, device=device)[seen // vocab_size]

        subtract = per_key([p.frequency_penalty for p in params]) * count
        subtract += per_key([p.presence_penalty for p in params]) * (count > 0)
        return cls(seen, per_key([p.repetition_penalty for p in params]), subtract)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        flat = logits.view(-1)
        values = flat[self.keys]
        values = torch.where(values > 0, values / self.repetition, values * self.repetition)
        flat[self.keys] = values - self.subtract
        return logits


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask (to -inf) logits outside each row's top-k and top-p sets. One sort for both."""
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    vocab = logits.shape[-1]
    if top_k is not None:
        kth = sorted_logits.gather(-1, (vocab - top_k).unsqueeze(-1))  # (N, 1)
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= (1 - top_p).unsqueeze(-1)
        drop[:, -1] = False  # always keep the most likely token
        sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def process_logits(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Bans, biases and penalties (steps 2 and 3 of the module doc), on every row; a
    structured output's grammar first (its banned tokens stay banned whatever follows)."""
    if st.grammar is not None:
        start = time.perf_counter()
        apply_bitmask(logits, *st.grammar)
        st.grammar_seconds = time.perf_counter() - start
    if st.allowed_rows is not None:
        rows = logits[st.allowed_rows]
        logits[st.allowed_rows] = rows.masked_fill(~st.allowed_mask, float("-inf"))
    if st.additive is not None:
        rows, ids, values = st.additive
        logits.index_put_((rows, ids), values, accumulate=True)
    if st.penalties is not None:
        logits = st.penalties.apply(logits)
    for processor, requests in st.processors:
        logits = processor.apply(logits, requests)
    return logits


def sample(
    logits: torch.Tensor, st: SamplingTensors, mode: LogprobsMode = LogprobsMode.RAW_LOGPROBS
) -> tuple[torch.Tensor, list[TokenLogprobs | None] | None]:
    """(N, vocab) fp32 logits -> (N,) token ids, and each row's logprobs where asked."""
    raw = logits if st.logprobs is not None and mode.name.startswith("RAW") else None
    if (
        st.grammar is not None
        or st.allowed_rows is not None
        or st.additive is not None
        or st.penalties is not None
        or st.processors
    ):
        logits = process_logits(logits.clone() if raw is not None else logits, st)
    # max().indices: 3x faster than argmax on CPU, the same first maximum on ties
    greedy_ids = logits.max(dim=-1).indices if st.any_greedy else None
    processed = logits
    if st.all_greedy:
        token_ids = greedy_ids
    else:
        scaled = logits / st.temperature.unsqueeze(-1)
        # Rows with a top-k draw from their k best alone (a full-vocab sort costs ~25x more
        # at a 49k vocab); the others, and every row when processed logprobs are wanted,
        # take the full path. Which path a row takes depends only on its own parameters.
        wants_processed = st.logprobs is not None and raw is None
        fast = [] if wants_processed else st.top_k_rows
        full = st.random_rows if not fast else [i for i in st.random_rows if i not in fast]
        sampled = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
        rest = _sample_full if wants_processed or st.top_p is None else _sample_top_p
        for rows, draw in ((fast, _sample_top_k), (full, rest)):
            if rows:
                at = torch.tensor(rows, device=logits.device)
                sampled[at], processed_rows = draw(
                    scaled[at],
                    None if st.top_k is None else st.top_k[at],
                    None if st.top_p is None else st.top_p[at],
                    None if st.min_p is None else st.min_p[at],
                    [st.generators[i] for i in rows],
                )
                if wants_processed and processed_rows is not None:
                    processed = processed.clone()
                    processed[at] = processed_rows
        token_ids = sampled if greedy_ids is None else torch.where(st.greedy, greedy_ids, sampled)
    if st.logprobs is None:
        return token_ids, None
    source = raw if raw is not None else processed
    if mode in (LogprobsMode.RAW_LOGPROBS, LogprobsMode.PROCESSED_LOGPROBS):
        source = source.log_softmax(dim=-1)
    return token_ids, gather_logprobs(source, token_ids, st.logprobs)


def _min_p(probs: torch.Tensor, min_p: torch.Tensor | None) -> torch.Tensor:
    if min_p is None:
        return probs
    floor = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(-1)
    return probs.masked_fill(probs < floor, 0.0)


def _noise(shape, generators: list, device) -> torch.Tensor:
    """Exp(1) noise for Gumbel-max, a vocab-sized row per request; a seeded row from its
    own generator (so its draws never depend on the batch)."""
    noise = torch.empty(shape, device=device)
    if any(g is not None for g in generators):
        for row, gen in enumerate(generators):
            noise[row].exponential_(generator=gen)
    else:
        noise.exponential_()
    return noise


def _sample_full(scaled, top_k, top_p, min_p, generators):
    """Rows without a top-k: mask the full distribution, then Gumbel-max. Returns the
    tokens and the processed logits."""
    processed = apply_top_k_top_p(scaled, top_k, top_p)
    probs = processed.softmax(dim=-1)
    noise = _noise(probs.shape, generators, probs.device)
    return _min_p(probs, min_p).div_(noise).max(dim=-1).indices, processed


def _sample_top_p(scaled, top_k, top_p, min_p, generators):
    """Rows without a top-k but with a top-p: when a row's TOP_P_CANDIDATES likeliest tokens
    hold at least top_p of the mass, its top-p set lies among them and only they are drawn
    from (exactly the full path's distribution, and its tokens for seeded rows); other rows
    take the full path."""
    if scaled.shape[-1] <= TOP_P_CANDIDATES:
        return _sample_full(scaled, top_k, top_p, min_p, generators)
    probs, ids = scaled.softmax(dim=-1).topk(TOP_P_CANDIDATES, dim=-1)  # most likely first
    covered = (probs.sum(dim=-1) >= top_p).tolist()
    out = torch.zeros(scaled.shape[0], dtype=torch.int64, device=scaled.device)
    rows = [i for i, c in enumerate(covered) if c]
    if rows:
        at = torch.tensor(rows, device=scaled.device)
        p, cand = probs[at], ids[at]
        before = p.cumsum(dim=-1) - p  # mass of the full distribution before each token
        p = p.masked_fill(before >= top_p[at].unsqueeze(-1), 0.0)
        p = _min_p(p, None if min_p is None else min_p[at])
        out[at] = _draw_candidates(p, cand, [generators[i] for i in rows], scaled.shape[-1])
    rest = [i for i, c in enumerate(covered) if not c]
    if rest:
        at = torch.tensor(rest, device=scaled.device)
        out[at], _ = _sample_full(
            scaled[at],
            None if top_k is None else top_k[at],
            top_p[at],
            None if min_p is None else min_p[at],
            [generators[i] for i in rest],
        )
    return out, None


def _sample_top_k(scaled, top_k, top_p, min_p, generators):
    """Rows with a top-k: only their k best are sorted and drawn from. The same
    distribution as the full path, and the same tokens for seeded rows: their noise is
    still drawn vocab-wide and gathered at the candidates."""
    k_max = int(top_k.max())
    values, ids = scaled.topk(k_max, dim=-1)  # (rows, K), most likely first
    ranks = torch.arange(k_max, device=scaled.device)
    values = values.masked_fill(ranks >= top_k.unsqueeze(-1), float("-inf"))
    probs = values.softmax(dim=-1)
    if top_p is not None:  # keep a token while the mass before it is below top_p
        before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(before >= top_p.unsqueeze(-1), 0.0)
    probs = _min_p(probs, min_p)
    return _draw_candidates(probs, ids, generators, scaled.shape[-1]), None


def _draw_candidates(probs, ids, generators, vocab_size: int) -> torch.Tensor:
    """Gumbel-max over each row's candidate tokens `ids` with their `probs`. A seeded row's
    noise is drawn vocab-wide and gathered at its candidates: the full path's draws."""
    if any(g is not None for g in generators):
        noise = _noise((len(generators), vocab_size), generators, probs.device).gather(1, ids)
    else:
        noise = torch.empty_like(probs).exponential_()
    return ids.gather(1, probs.div_(noise).max(dim=-1, keepdim=True).indices).squeeze(1)


def gather_logprobs(
    values: torch.Tensor, token_ids: torch.Tensor, num_top: list[int | None]
) -> list[TokenLogprobs | None]:
    """Each asking row's chosen-token value, rank and top alternatives (one host sync)."""
    k = max(n for n in num_top if n is not None)
    chosen = values.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    ranks = (values > chosen.unsqueeze(1)).sum(dim=1) + 1
    if k:
        top_values, top_ids = values.topk(k, dim=-1)
    else:
        top_values, top_ids = values[:, :0], token_ids[:, None][:, :0]
    chosen, ranks = chosen.tolist(), ranks.tolist()
    top_values, top_ids, ids = top_values.tolist(), top_ids.tolist(), token_ids.tolist()
    return [
        None
        if n is None
        else TokenLogprobs(ids[i], chosen[i], ranks[i], top_ids[i][:n], top_values[i][:n])
        for i, n in enumerate(num_top)
    ]
