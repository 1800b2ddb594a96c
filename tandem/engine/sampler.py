"""Batched sampling with vLLM V1's parameters and order, and logprobs.

Per step, on the rows that sample: (1) the raw logprobs, when asked for; (2) bans and
biases: allowed_token_ids, bad words, EOS and stop tokens before min_tokens, logit_bias;
(3) penalties: repetition (prompt and output), frequency and presence (output), then the
global logits processors (logits_processors.py); then greedy
rows take the argmax and random rows apply temperature, top-k, top-p and min-p and sample
by Gumbel-max (argmax of probs / Exp(1) noise: no sync, no multinomial). A seeded request
draws its noise from its own generator, so its tokens do not depend on what else shares
the batch. Everything is a tensor operation over the batch; Python only lists which
(row, token) pairs a ban or a bias touches.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from tandem.engine.request import Request


class LogprobsMode(enum.Enum):
    """What `logprobs` report, as vLLM's --logprobs-mode: the model's raw distribution, or
    the one sampled from (after bans, biases, penalties, temperature, top-k/top-p)."""

    RAW_LOGPROBS = "raw_logprobs"
    PROCESSED_LOGPROBS = "processed_logprobs"
    RAW_LOGITS = "raw_logits"
    PROCESSED_LOGITS = "processed_logits"


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
    # (rows, token ids, values) added to the logits: biases, and -inf for every ban
    additive: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    allowed_rows: torch.Tensor | None = None  # rows restricted to allowed_token_ids
    allowed_mask: torch.Tensor | None = None  # (len(allowed_rows), vocab) bool
    penalties: _Penalties | None = None
    logprobs: list[int | None] | None = None  # per row: alternatives asked for (None: none)
    processors: list = field(default_factory=list)  # (global logits processor, requests)

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
    """Repetition, frequency and presence penalties of a batch, as vLLM applies them."""

    output_counts: torch.Tensor  # (N, vocab) float: each token's count in the output
    seen: torch.Tensor  # (N, vocab) bool: in the prompt or the output (repetition)
    presence: torch.Tensor  # (N, 1)
    frequency: torch.Tensor  # (N, 1)
    repetition: torch.Tensor  # (N, 1)

    @classmethod
    def build(cls, requests: list[Request], vocab_size: int, device: torch.device) -> _Penalties:
        n = len(requests)

        def padded(lists: list[list[int]]) -> torch.Tensor:
            width = max((len(x) for x in lists), default=0) or 1
            out = torch.full((n, width), vocab_size, dtype=torch.int64)  # pad: a spare column
            for i, x in enumerate(lists):
                out[i, : len(x)] = torch.tensor(x, dtype=torch.int64)
            return out.to(device)

        outputs = padded([r.output_token_ids for r in requests])
        counts = torch.zeros(n, vocab_size + 1, device=device)
        counts.scatter_add_(1, outputs, torch.ones_like(outputs, dtype=torch.float32))
        counts = counts[:, :vocab_size]
        prompt = torch.zeros(n, vocab_size + 1, dtype=torch.bool, device=device)
        prompt.scatter_(1, padded([r.prompt_token_ids for r in requests]), True)
        params = [r.sampling_params for r in requests]

        def column(values):
            return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)

        return cls(
            output_counts=counts,
            seen=prompt[:, :vocab_size] | (counts > 0),
            presence=column([p.presence_penalty for p in params]),
            frequency=column([p.frequency_penalty for p in params]),
            repetition=column([p.repetition_penalty for p in params]),
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        scaled = torch.where(logits > 0, logits / self.repetition, logits * self.repetition)
        logits = torch.where(self.seen, scaled, logits)
        logits = logits - self.frequency * self.output_counts
        return logits - self.presence * (self.output_counts > 0).float()


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
    """Bans, biases and penalties (steps 2 and 3 of the module doc), on every row."""
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
        st.allowed_rows is not None
        or st.additive is not None
        or st.penalties is not None
        or st.processors
    ):
        logits = process_logits(logits.clone() if raw is not None else logits, st)
    greedy_ids = logits.max(dim=-1).indices  # 3x faster than argmax on CPU; same first-max ties
    if st.all_greedy:
        token_ids, processed = greedy_ids, logits
    else:
        processed = apply_top_k_top_p(logits / st.temperature.unsqueeze(-1), st.top_k, st.top_p)
        probs = processed.softmax(dim=-1)
        if st.min_p is not None:
            floor = probs.amax(dim=-1, keepdim=True) * st.min_p.unsqueeze(-1)
            probs = probs.masked_fill(probs < floor, 0.0)
        noise = torch.empty_like(probs)
        if any(g is not None for g in st.generators):
            for row, gen in enumerate(st.generators):
                noise[row].exponential_(generator=gen)
        else:
            noise.exponential_()
        sampled = probs.div_(noise).max(dim=-1).indices
        token_ids = torch.where(st.greedy, greedy_ids, sampled)
    if st.logprobs is None:
        return token_ids, None
    source = raw if raw is not None else processed
    if mode in (LogprobsMode.RAW_LOGPROBS, LogprobsMode.PROCESSED_LOGPROBS):
        source = source.log_softmax(dim=-1)
    return token_ids, gather_logprobs(source, token_ids, st.logprobs)


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
