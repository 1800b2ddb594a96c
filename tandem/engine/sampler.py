"""Batched sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds.

Random rows use Gumbel-max (argmax of probs / Exp(1) noise): no sync, no multinomial. A
seeded request draws its noise from its own generator, so its tokens do not depend on what
else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.engine.request import SamplingParams


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

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        vocab_size: int,
        device: torch.device,
    ) -> SamplingTensors:
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

        return cls(
            temperature=torch.tensor(t, dtype=torch.float32, device=device),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            top_k=opt(k, vocab_size, torch.int64),
            top_p=opt(tp, 1.0, torch.float32),
            min_p=opt(mp, 0.0, torch.float32),
            generators=generators,
            all_greedy=all(greedy),
        )


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


def sample(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """(N, vocab) fp32 logits -> (N,) token ids."""
    greedy_ids = logits.max(dim=-1).indices  # 3x faster than argmax on CPU; same first-max ties
    if st.all_greedy:
        return greedy_ids
    logits = logits / st.temperature.unsqueeze(-1)
    logits = apply_top_k_top_p(logits, st.top_k, st.top_p)
    probs = logits.softmax(dim=-1)
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
    return torch.where(st.greedy, greedy_ids, sampled)
