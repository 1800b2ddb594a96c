"""Suffix decoding, as vLLM's `{"method": "suffix"}` (Arctic Inference's method): the
request's recent tokens are matched against two sources, its own prompt and output, and the
responses of earlier requests (the last `max_cached_requests` this engine finished). Where
they occur, the tokens that followed are counted as a suffix tree would count them: the
proposal follows, from the matched suffix, the most frequent next token while its estimated
probability (the product of each step's count / the count before it) stays at or above
`min_token_prob`; it is at most `max_spec_factor` x the match's length long, and match and
proposal together at most `max_tree_depth` tokens. Every match length is tried; the proposal
with the highest score (the sum of its tokens' probabilities) of either source is kept.

No tree is built: each source is a flat array searched where its tokens equal the request's
last token (the request's own, by one vectorized comparison; earlier responses, through an
index of each token's most recent positions, at most INDEX_DEPTH of them), and the match
lengths of all those places are extended together one token back at a time."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from tandem.engine.config import SpeculativeConfig

INDEX_DEPTH = 4096  # positions of a token in earlier responses that are searched (latest)
SEPARATOR = -1  # between responses: never equal to a token


def _match_lengths(source: np.ndarray, ends: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """How many tokens up to each of `ends` (inclusive) equal the end of `pattern`, each
    place's count (>= 1: `source[ends]` equals the pattern's last token)."""
    lengths = np.ones(len(ends), dtype=np.int64)
    alive = np.ones(len(ends), dtype=bool)
    for back in range(1, len(pattern)):
        at = ends - back
        ok = alive & (at >= 0)
        ok[ok] = source[at[ok]] == pattern[-1 - back]
        if not ok.any():
            break
        lengths += ok
        alive = ok
    return lengths


def _walk(source: np.ndarray, ends: np.ndarray, limit: int, min_prob: float):
    """From the places `ends` (a matched suffix's occurrences): the most frequent next token
    while its running probability stays >= min_prob, at most `limit` of them; and the score
    (the sum of those probabilities)."""
    tokens: list[int] = []
    prob, score = 1.0, 0.0
    for step in range(1, limit + 1):
        at = ends + step
        following = np.full(len(ends), SEPARATOR, dtype=np.int64)
        inside = at < len(source)
        following[inside] = source[at[inside]]
        real = following[following != SEPARATOR]
        if not len(real):
            break
        values, counts = np.unique(real, return_counts=True)
        top = values[counts == counts.max()]
        # a tie goes to the token that followed the latest occurrence
        token = int(top[0]) if len(top) == 1 else int(real[np.isin(real, top)][-1])
        prob *= counts.max() / len(ends)  # occurrences that end here count, as in a tree
        if prob < min_prob:
            break
        tokens.append(token)
        score += prob
        ends = ends[following == token]
    return tokens, score


def speculate(
    source: np.ndarray, ends: np.ndarray, pattern: np.ndarray, max_tokens: int,
    config: SpeculativeConfig,
) -> tuple[list[int], float]:  # fmt: skip
    """The best proposal (and its score) from the occurrences `ends` of the pattern's last
    token in `source`, over every match length."""
    if not len(ends) or max_tokens < 1:
        return [], 0.0
    depth = config.suffix_decoding_max_tree_depth
    lengths = _match_lengths(source, ends, pattern[-(depth - 1) :])
    best: tuple[list[int], float] = ([], 0.0)
    # the occurrences matching at least n tokens change only at the lengths found; the
    # longest n of each such set allows the longest proposal
    for n in np.unique(lengths)[::-1]:
        n = int(n)
        limit = min(max_tokens, int(config.suffix_decoding_max_spec_factor * n), depth - n)
        if limit < 1:
            continue
        found = _walk(source, ends[lengths >= n], limit, config.suffix_decoding_min_token_prob)
        if found[1] > best[1]:
            best = found
    return best


class ResponseCache:
    """The responses of the last `max_requests` finished requests, one flat array (separated
    by SEPARATOR), with each token's latest positions."""

    def __init__(self, max_requests: int) -> None:
        self.max_requests = max_requests
        self.buffer = np.full(1024, SEPARATOR, dtype=np.int64)
        self.offset = 0  # the absolute position of buffer[0]
        self.end = 0  # absolute end of what is written
        self.spans: deque[tuple[int, int]] = deque()  # each response's absolute [start, end)
        self.index: dict[int, deque[int]] = {}

    def add(self, tokens: Sequence[int]) -> None:
        if self.max_requests == 0 or not tokens:
            return
        need = self.end + len(tokens) + 1 - self.offset
        if need > len(self.buffer):
            self._compact(need)
        start = self.end - self.offset
        self.buffer[start : start + len(tokens)] = tokens
        self.buffer[start + len(tokens)] = SEPARATOR
        for i, token in enumerate(tokens):
            self.index.setdefault(int(token), deque(maxlen=INDEX_DEPTH)).append(self.end + i)
        self.spans.append((self.end, self.end + len(tokens)))
        self.end += len(tokens) + 1
        while len(self.spans) > self.max_requests:  # evicted first in, first out
            self.spans.popleft()

    def _compact(self, need: int) -> None:
        """Drop the evicted responses from the buffer's front; grow it if still short."""
        live = self.spans[0][0] if self.spans else self.end
        kept = self.buffer[live - self.offset : self.end - self.offset]
        size = max(len(self.buffer), 2 * (len(kept) + need - (self.end - self.offset)))
        self.buffer = np.full(size, SEPARATOR, dtype=np.int64)
        self.buffer[: len(kept)] = kept
        self.offset = live

    def occurrences(self, token: int) -> np.ndarray:
        """Buffer positions of `token` in the responses still cached."""
        positions = self.index.get(token)
        if not positions or not self.spans:
            return np.empty(0, dtype=np.int64)
        at = np.fromiter(positions, dtype=np.int64, count=len(positions))
        return at[at >= self.spans[0][0]] - self.offset

    @property
    def tokens(self) -> np.ndarray:
        return self.buffer[: self.end - self.offset]


class SuffixProposer:
    """Suffix decoding's proposals for each decode, from its own tokens and earlier responses."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.responses = ResponseCache(config.suffix_decoding_max_cached_requests)

    def propose(self, requests: list) -> list[list[int]]:
        return [self._one(r.all_token_ids) for r in requests]

    def _one(self, tokens: Sequence[int]) -> list[int]:
        c = self.config
        context = np.asarray(tokens, dtype=np.int64)
        pattern = context[-c.suffix_decoding_max_tree_depth :]
        last = context[-1]
        own = np.flatnonzero(context[:-1] == last)  # earlier places, not the end itself
        best = speculate(context, own, pattern, c.num_speculative_tokens, c)
        cached = self.responses.occurrences(int(last))
        other = speculate(self.responses.tokens, cached, pattern, c.num_speculative_tokens, c)
        return (other if other[1] > best[1] else best)[0]

    def finish(self, requests: list) -> None:
        """Cache the responses of requests that ended."""
        for request in requests:
            self.responses.add(request.output_token_ids)

    def release(self, request_ids) -> None:
        pass  # nothing kept per running request
