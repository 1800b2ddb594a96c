"""Draft-model proposals, as vLLM's `{"model": PATH, "num_speculative_tokens": k}`: a smaller
model with the target's tokenizer runs k greedy steps after each request's tokens, one
batched forward pass per step; its argmax tokens are the proposals (a point mass each, so
the rejection sampler's output is exact whatever the draft says).

The draft keeps its own paged KV cache beside the target's (the same block size and number
of blocks, its own smaller block shape) and its own bookkeeping: per request, its blocks and
the tokens whose KV it wrote. Its KV of a prompt is recomputed here, on the worker that
decodes: the first proposal for a request catches up over all its tokens in one chunked pass
(a prefill worker ships the target's KV only). Each step after, only tokens the draft has not
seen (the last accepted ones and the step's bonus token) are fed before its k passes; KV of
proposals the target rejected is overwritten then. A request that stops running frees its
draft blocks; one that comes back recomputes."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from tandem.engine.attention import build_attn_metadata
from tandem.engine.config import SpeculativeConfig
from tandem.engine.loader import load_model

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _DraftState:
    blocks: list[int] = field(default_factory=list)
    written: list[int] = field(default_factory=list)  # tokens whose KV the draft holds
    stable: int = 0  # leading tokens of `written` known to be the request's own


class DraftModelProposer:
    def __init__(self, config: SpeculativeConfig, runner) -> None:
        self.config = config
        self.device, self.block_size = runner.device, runner.block_size
        self.model = load_model(config.model, runner.dtype, self.device)
        a = self.model.args
        if a.vocab_size != runner.info.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({a.vocab_size}) is not the target's "
                f"({runner.info.vocab_size}): it must share the target's tokenizer"
            )
        self.max_len = min(a.max_position_embeddings, runner.info.max_model_len)
        num_blocks = runner.info.num_blocks  # never more in use than the target has
        shape = (num_blocks, a.num_kv_heads, self.block_size, a.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=runner.dtype, device=self.device),
             torch.zeros(shape, dtype=runner.dtype, device=self.device))
            for _ in range(a.num_layers)
        ]  # fmt: skip
        if hasattr(self.model, "stack_rows"):  # a CPU's decode path, as the target's
            self.model.stack_rows(self.kv_caches)
        self.free_blocks = list(range(num_blocks - 1, -1, -1))
        self.states: dict[str, _DraftState] = {}
        # the cost of the draft: tokens it caught up on (the prompts' above all) and time
        self.catch_up_tokens = 0
        self.catch_up_seconds = 0.0
        self.propose_seconds = 0.0
        elem = torch.finfo(runner.dtype).bits // 8
        block_bytes = 2 * a.num_layers * self.block_size * a.num_kv_heads * a.head_dim * elem
        logger.info("draft model %s: %d layers, KV cache %.2f GiB", config.model, a.num_layers,
                    num_blocks * block_bytes / 2**30)  # fmt: skip

    def finish(self, requests: list) -> None:
        pass  # their blocks go with `release`

    def release(self, request_ids) -> None:
        """Free the draft blocks of requests no longer running here."""
        for request_id in request_ids:
            state = self.states.pop(request_id, None)
            if state is not None:
                self.free_blocks += state.blocks

    def propose(self, requests: list) -> list[list[int]]:
        """Up to k proposals per request (fewer near the context's end; none when the
        draft's cache is full)."""
        start = time.perf_counter()
        out: list[list[int]] = [[] for _ in requests]
        entries = []  # [index into requests, state, proposals wanted, tokens to feed]
        for i, request in enumerate(requests):
            tokens = request.all_token_ids
            n = min(self.config.num_speculative_tokens, self.max_len - len(tokens))
            state = self.states.setdefault(request.request_id, _DraftState())
            if n < 1 or not self._reserve(state, len(tokens) + n - 1):
                continue
            seen = self._seen(state, tokens)
            state.written += tokens[seen:]
            state.stable = len(tokens)
            entries.append((i, state, n, tokens[seen:]))
        first = True
        while entries:
            if first:
                self.catch_up_tokens += sum(len(feed) - 1 for *_, feed in entries)
            tick = time.perf_counter()
            tokens = self._forward([(state, feed) for _, state, _, feed in entries])
            if first:
                self.catch_up_seconds += time.perf_counter() - tick
                first = False
            following = []
            for (i, state, n, _), token in zip(entries, tokens):
                out[i].append(token)
                if len(out[i]) < n:  # fed next: its KV written then
                    state.written.append(token)
                    following.append((i, state, n, [token]))
            entries = following
        self.propose_seconds += time.perf_counter() - start
        return out

    def _reserve(self, state: _DraftState, num_tokens: int) -> bool:
        """Blocks for `num_tokens` positions; False (nothing taken) when too few are free."""
        need = -(-num_tokens // self.block_size) - len(state.blocks)
        if need > len(self.free_blocks):
            return False
        for _ in range(max(need, 0)):
            state.blocks.append(self.free_blocks.pop())
        return True

    @torch.inference_mode()
    def _forward(self, items: list[tuple[_DraftState, list[int]]]) -> list[int]:
        """One pass of the draft over each item's tokens to feed (the last of its `written`);
        each item's argmax next token."""
        order = sorted(range(len(items)), key=lambda j: len(items[j][1]) != 1)  # decodes first
        input_ids, positions, query_lens, context_lens, tables, last_rows = [], [], [], [], [], []
        for j in order:
            state, feed = items[j]
            end = len(state.written)
            input_ids += feed
            positions += range(end - len(feed), end)
            query_lens.append(len(feed))
            context_lens.append(end)
            tables.append(state.blocks)
            last_rows.append(len(input_ids) - 1)
        dev = self.device
        meta = build_attn_metadata(query_lens, context_lens, tables, self.block_size, dev)
        hidden = self.model(torch.tensor(input_ids, dtype=torch.int64, device=dev),
                            torch.tensor(positions, dtype=torch.int64, device=dev), meta,
                            self.kv_caches)  # fmt: skip
        logits = self.model.compute_logits(hidden[torch.tensor(last_rows, device=dev)])
        best = logits.argmax(dim=-1).tolist()
        tokens = [0] * len(items)
        for j, token in zip(order, best):
            tokens[j] = token
        return tokens

    def _seen(self, state: _DraftState, tokens: list[int]) -> int:
        """How many leading tokens' KV the draft holds for this request: `written` up to its
        first difference from the request's tokens (only the tail after `stable` can differ:
        proposals the target rejected)."""
        seen = min(len(state.written), len(tokens) - 1)  # the last token is always fed
        for i in range(state.stable, seen):
            if state.written[i] != tokens[i]:
                seen = i
                break
        del state.written[seen:]
        return seen
