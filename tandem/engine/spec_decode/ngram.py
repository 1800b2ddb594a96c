"""Prompt-lookup (n-gram) proposals, as vLLM's `{"method": "ngram"}`: the request's last n
tokens (n from prompt_lookup_max down to prompt_lookup_min) are looked for earlier in its
own prompt and output; the tokens that followed the latest earlier occurrence are proposed.
No model: one vectorized comparison of the context with its suffix per n."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def propose_ngram(
    tokens: Sequence[int], num_speculative_tokens: int, lookup_min: int, lookup_max: int
) -> list[int]:
    """Up to `num_speculative_tokens` tokens to follow `tokens`; [] when no n-gram of
    `lookup_min`..`lookup_max` tokens ending the sequence occurs earlier in it."""
    context = np.asarray(tokens, dtype=np.int64)
    length = len(context)
    for n in range(min(lookup_max, length - 1), lookup_min - 1, -1):
        # every earlier window of n tokens, against the last n
        windows = sliding_window_view(context[: length - 1], n)
        hits = np.flatnonzero((windows == context[length - n :]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n  # after the latest occurrence
            return context[start : start + num_speculative_tokens].tolist()
    return []


class NgramProposer:
    """Prompt-lookup proposals for each decode."""

    def __init__(self, config) -> None:
        self.config = config

    def propose(self, requests: list) -> list[list[int]]:
        c = self.config
        return [
            propose_ngram(
                r.all_token_ids, c.num_speculative_tokens, c.prompt_lookup_min, c.prompt_lookup_max
            )  # fmt: skip
            for r in requests
        ]

    def finish(self, requests: list) -> None:
        pass  # nothing kept across requests

    def release(self, request_ids) -> None:
        pass
