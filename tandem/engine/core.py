"""EngineCore: scheduler + KV cache manager + model runner, stepped by its owner.

Lifecycle: construct (loads the model, sizes the cache) -> add_request / step / abort ->
drop. The in-process LLM steps it in a loop; the gateway's in-process client steps it on a
background thread; workers drive it from token-budget plans.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tandem.engine.config import EngineConfig
from tandem.engine.kv_cache_manager import KVCacheManager
from tandem.engine.model_runner import ModelRunner
from tandem.engine.request import Request, RequestStatus
from tandem.engine.scheduler import Scheduler

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StepOutput:
    """One request's news from a step: its new token (if any) and whether it finished."""

    request: Request
    new_token_ids: list[int]
    finished: bool


class EngineCore:
    """The inference core shared by every way of running Tandem."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.runner = ModelRunner(config.model, config.cache)
        info = self.runner.info
        self.max_model_len = info.max_model_len
        self.eos_token_id = self.runner.eos_token_id
        capacity = info.num_blocks * config.cache.block_size
        if info.max_model_len > capacity:
            # One request at max_model_len could never run, even alone: refuse, like vLLM.
            raise ValueError(
                f"max_model_len ({info.max_model_len}) is larger than the KV cache holds "
                f"({capacity} tokens in {info.num_blocks} blocks): lower --max-model-len "
                "or give the cache more blocks"
            )
        self.kv = KVCacheManager(
            info.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(config.scheduler, self.kv, info.max_model_len)
        self.num_steps = 0

    def add_request(self, request: Request) -> None:
        """Validate against the engine's limits and queue. Raises ValueError on bad input."""
        if request.eos_token_id is None:
            request.eos_token_id = self.eos_token_id
        vocab = self.runner.info.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        self.scheduler.add_request(request)

    def abort(self, request_id: str) -> None:
        if self.scheduler.abort(request_id) is not None:
            self.runner.release([request_id])

    def finish(self, request_id: str, status: RequestStatus) -> None:
        """End a request for a reason found outside the engine (a stop string)."""
        request = self.scheduler.requests.get(request_id)
        if request is not None:
            self.scheduler.finish(request, status)
            self.runner.release([request_id])

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> list[StepOutput]:
        """Schedule, run the model once, and report each request that produced a token."""
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        num_scheduled = [plan.num_scheduled_tokens[r.request_id] for r in plan.requests]
        tables = [self.kv.block_ids(r.request_id) for r in plan.requests]
        sampled = self.runner.execute(plan.requests, num_scheduled, tables)
        finished = self.scheduler.update_from_output(plan, sampled)
        if finished:
            self.runner.release([r.request_id for r in finished])
        self.num_steps += 1
        return [
            StepOutput(req, [tok], req.is_finished)
            for req, tok in zip(plan.requests, sampled)
            if tok is not None
        ]

    def reset_prefix_cache(self) -> bool:
        return self.kv.reset_prefix_cache()
