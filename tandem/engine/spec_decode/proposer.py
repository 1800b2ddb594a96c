"""The engine's side of speculative decoding: after each step, each running decode gets its
proposals for the next (the scheduler schedules them, the runner verifies them); and the
counts vLLM's spec_decode metrics report. Proposers (ngram.py, suffix.py, draft.py) share
one interface: `propose(requests) -> one list of tokens per request`, `finish(requests)` for
those that ended and `release(request_ids)` for those no longer running here (ended,
preempted or moved); another kind (an EAGLE-style head) joins by implementing it.

Proposals adapt, as vLLM's dynamic speculation does, by two rules: none while more requests
run than `disable_by_batch_size` (verification then costs more than it saves), and a request
whose proposals keep being rejected (under LOW_ACCEPTANCE of its last PROBE_TOKENS proposed
tokens accepted) stops proposing for BACKOFF_STEPS steps, then tries again."""

from __future__ import annotations

from tandem.engine.config import SpeculativeConfig
from tandem.engine.request import Request
from tandem.engine.spec_decode.ngram import NgramProposer

PROBE_TOKENS = 8
LOW_ACCEPTANCE = 0.2
BACKOFF_STEPS = 32


class SpecDecoding:
    def __init__(self, config: SpeculativeConfig, runner=None) -> None:
        self.config = config
        if config.method == "suffix":
            from tandem.engine.spec_decode.suffix import SuffixProposer

            self.proposer = SuffixProposer(config)
        elif config.method == "draft_model":  # a model beside the runner's, on its device
            from tandem.engine.spec_decode.draft import DraftModelProposer

            self.proposer = DraftModelProposer(config, runner)
        else:
            self.proposer = NgramProposer(config)
        # request id -> [tokens proposed, accepted, steps left without proposals]
        self.recent: dict[str, list[int]] = {}
        self.num_drafts = 0  # verification steps of a request
        self.num_draft_tokens = 0  # proposals verified
        self.num_accepted_tokens = 0
        self.num_accepted_tokens_per_pos = [0] * config.num_speculative_tokens

    def propose(self, running: list[Request]) -> None:
        """Proposals for every running decode; none while the batch is larger than
        disable_by_batch_size (verifying would cost more than it saves there)."""
        c = self.config
        off = c.disable_by_batch_size is not None and len(running) > c.disable_by_batch_size
        gone = self.recent.keys() - {r.request_id for r in running}
        if gone:
            self.proposer.release(gone)
        self.recent = {r.request_id: self.recent.get(r.request_id, [0, 0, 0]) for r in running}
        proposing = []
        for request in running:
            request.spec_token_ids = []
            recent = self.recent[request.request_id]
            if recent[2] > 0:  # backing off after low acceptance
                recent[2] -= 1
            elif not off and self._may_speculate(request):
                proposing.append(request)
        if proposing:
            for request, tokens in zip(proposing, self.proposer.propose(proposing)):
                request.spec_token_ids = tokens

    def draft_cost(self) -> dict | None:
        """A draft model's tokens caught up on and seconds spent (None for other methods)."""
        p = self.proposer
        if not hasattr(p, "catch_up_tokens"):
            return None
        return {"catch_up_tokens": p.catch_up_tokens, "catch_up_seconds": p.catch_up_seconds,
                "seconds": p.propose_seconds}  # fmt: skip

    def finish(self, requests: list[Request]) -> None:
        """Requests that ended (suffix decoding searches their responses later)."""
        self.proposer.finish(requests)

    @staticmethod
    def _may_speculate(request: Request) -> bool:
        """A decode (its prompt done, tokens out); with a structured output, once its matcher
        is there and any reasoning is over (each verified position then has its mask)."""
        grammar = request.grammar
        return (
            (
                grammar is None
                or (grammar.matcher is not None and (grammar.gate is None or grammar.gate.ended))
            )
            and request.sampling_params.pooling is None
            and request.num_output_tokens > 0
            and request.num_computed_tokens == request.num_tokens - 1
        )

    def count(self, spec_ids: dict[str, list[int]], requests: list[Request], sampled) -> None:
        for request, tokens in zip(requests, sampled):
            drafts = spec_ids.get(request.request_id)
            if not drafts or not isinstance(tokens, list):
                continue
            accepted = len(tokens) - 1
            recent = self.recent.setdefault(request.request_id, [0, 0, 0])
            recent[0] += len(drafts)
            recent[1] += accepted
            if recent[0] >= PROBE_TOKENS:
                if recent[1] < LOW_ACCEPTANCE * recent[0]:
                    recent[2] = BACKOFF_STEPS
                recent[0] = recent[1] = 0
            self.num_drafts += 1
            self.num_draft_tokens += len(drafts)
            self.num_accepted_tokens += accepted
            for pos in range(accepted):
                self.num_accepted_tokens_per_pos[pos] += 1
