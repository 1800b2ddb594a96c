"""Rejection sampling of proposed tokens against the target model (vLLM's rejection sampler,
after Leviathan et al. and Chen et al.): the tokens it outputs are distributed exactly as
sampling the target model one position at a time.

For one request with proposals d_1..d_k, target distributions p_1..p_{k+1} (the k + 1
verified positions, each already processed as its own sampling step: penalties, bans,
temperature, top-k/top-p) and proposal distributions q_1..q_k:
- greedy: d_i is accepted while it is p_i's argmax; the first position that rejects outputs
  its argmax instead; all k accepted, the bonus token is p_{k+1}'s argmax.
- random: d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first
  rejection a token is drawn from the residual max(0, p_i - q_i), renormalized; all accepted,
  the bonus token is drawn from p_{k+1}. An n-gram proposal is a point mass (q_i(d_i) = 1):
  accepted with probability p_i(d_i), the residual being p_i without d_i.
"""

from __future__ import annotations

import torch


def rejection_sample(
    target_probs: torch.Tensor,  # (k + 1, V) float32, rows summing to 1 (greedy: any scores)
    draft_ids: list[int],  # k
    greedy: bool,
    generator: torch.Generator | None = None,
    draft_probs: torch.Tensor | None = None,  # (k, V); None: point masses on draft_ids
) -> list[int]:
    """The tokens this step outputs: the accepted proposals, then one more (the correction
    at the first rejection, or the bonus token), so between 1 and k + 1 of them."""
    k = len(draft_ids)
    if greedy:
        best = target_probs.argmax(dim=-1).tolist()
        out = []
        for i in range(k):
            if best[i] != draft_ids[i]:
                return out + [best[i]]
            out.append(draft_ids[i])
        return out + [best[k]]
    device = target_probs.device
    uniform = torch.rand(k, generator=generator, device=device).tolist() if k else []
    out = []
    for i, d in enumerate(draft_ids):
        p = target_probs[i]
        q_d = 1.0 if draft_probs is None else float(draft_probs[i, d])
        if q_d > 0 and uniform[i] < min(1.0, float(p[d]) / q_d):
            out.append(d)
            continue
        if draft_probs is None:
            residual = p.clone()
            residual[d] = 0.0
        else:
            residual = (p - draft_probs[i]).clamp_(min=0.0)
        total = float(residual.sum())
        if total <= 0.0:  # p put all its mass on d (then d is never rejected): guard
            residual, total = p, float(p.sum())
        token = torch.multinomial(residual / total, 1, generator=generator)
        return out + [int(token)]
    bonus = torch.multinomial(target_probs[k], 1, generator=generator)
    return out + [int(bonus)]
