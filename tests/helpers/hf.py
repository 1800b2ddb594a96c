"""Hugging Face transformers as the reference the engine is checked against."""

from __future__ import annotations

import torch


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Hugging Face's greedy continuation of `prompt_ids`, up to and including its EOS."""
    eos = model.generation_config.eos_token_id
    out = model.generate(
        torch.tensor([prompt_ids], device=model.device),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=model.device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=eos,
    )[0, len(prompt_ids) :].tolist()
    eos_ids = eos if isinstance(eos, list) else [eos]
    for i, t in enumerate(out):
        if t in eos_ids:
            return out[: i + 1]
    return out
