"""Global logits processors (vLLM V1's replacement for per-request ones): classes registered
at start-up with `--logits-processors module:Class` and applied to every step's batch.

A processor is built once per engine as `Class(vocab_size, device)` and called as
`apply(logits, requests) -> logits` on the (rows, vocab) fp32 logits of the requests that
sample this step, after bans, biases and penalties and before temperature and top-k/top-p
(so it acts on greedy rows too). It may change the logits in place.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import torch

from tandem.engine.request import Request


class LogitsProcessor(Protocol):
    def __init__(self, vocab_size: int, device: torch.device) -> None: ...

    def apply(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor: ...


def load_logits_processors(
    names: tuple[str, ...], vocab_size: int, device: torch.device
) -> list[LogitsProcessor]:
    """Import and build each `module:Class` (or `module.Class`). ValueError when one is not
    found or does not have an `apply` method."""
    processors = []
    for name in names:
        module_name, sep, attr = name.partition(":")
        if not sep:
            module_name, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise ValueError(
                f"logits_processors must name importable classes: {name} ({e})"
            ) from None
        processor = cls(vocab_size, device)
        if not callable(getattr(processor, "apply", None)):
            raise ValueError(f"logits_processors must have an apply method: {name}")
        processors.append(processor)
    return processors


class NoRepeatNGramLogitsProcessor:
    """Bans every token that would repeat an n-gram already in the request's tokens (prompt
    and output), as Hugging Face's `no_repeat_ngram_size`. Subclass to change `ngram_size`."""

    ngram_size = 3

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.device = device

    def apply(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        n = self.ngram_size
        rows: list[int] = []
        ids: list[int] = []
        for row, request in enumerate(requests):
            tokens = request.all_token_ids
            if len(tokens) < n:
                continue
            prefix = tuple(tokens[len(tokens) - n + 1 :])
            for i in range(len(tokens) - n + 1):
                if tuple(tokens[i : i + n - 1]) == prefix:
                    rows.append(row)
                    ids.append(tokens[i + n - 1])
        if rows:
            where = (torch.tensor(rows, device=self.device), torch.tensor(ids, device=self.device))
            logits.index_put_(where, torch.tensor(float("-inf"), device=self.device))
        return logits


class MinTokensLogitsProcessor:
    """An example that needs no request field: never end before 4 tokens, whatever the
    request asked (EOS banned until then)."""

    min_tokens = 4

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.device = device

    def apply(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        rows = [
            i
            for i, r in enumerate(requests)
            if r.num_output_tokens < self.min_tokens and r.eos_token_id is not None
        ]
        if rows:
            eos = [requests[i].eos_token_id for i in rows]
            where = (torch.tensor(rows, device=self.device), torch.tensor(eos, device=self.device))
            logits.index_put_(where, torch.tensor(float("-inf"), device=self.device))
        return logits
