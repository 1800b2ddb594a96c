"""Prompt-lookup (n-gram) proposals, as vLLM's `{"method": "ngram"}`: the request's last n
tokens (n from prompt_lookup_max down to prompt_lookup_min) are looked for earlier in its
own prompt and output; the tokens that followed the latest earlier occurrence are proposed.
Pure Python over token ids: no model, no tensors."""

from __future__ import annotations

from collections.abc import Sequence


def propose_ngram(
    tokens: Sequence[int], num_speculative_tokens: int, lookup_min: int, lookup_max: int
) -> list[int]:
    """Up to `num_speculative_tokens` tokens to follow `tokens`; [] when no n-gram of
    `lookup_min`..`lookup_max` tokens ending the sequence occurs earlier in it."""
    n_tokens = len(tokens)
    for n in range(min(lookup_max, n_tokens - 1), lookup_min - 1, -1):
        suffix = list(tokens[n_tokens - n :])
        first = suffix[0]
        # latest start i < n_tokens - n with tokens[i:i+n] == suffix
        for i in range(n_tokens - n - 1, -1, -1):
            if tokens[i] == first and list(tokens[i : i + n]) == suffix:
                follow = tokens[i + n : i + n + num_speculative_tokens]
                if follow:
                    return list(follow)
                break
    return []
