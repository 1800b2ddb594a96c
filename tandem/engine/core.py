"""EngineCore: scheduler + KV cache manager + model runner, stepped by its owner.

Lifecycle: construct (loads the model, sizes the cache) -> add_request / step / abort ->
drop. The in-process LLM steps it in a loop; the gateway's in-process client steps it on a
background thread; workers drive it from token-budget plans.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tandem.engine.block_pool import Block
from tandem.engine.config import EngineConfig
from tandem.engine.kv_cache_manager import KVCacheManager
from tandem.engine.lora.adapter import check_adapter
from tandem.engine.model_runner import ModelRunner
from tandem.engine.pooling import needs_whole_prompt
from tandem.engine.request import Request, RequestStatus
from tandem.engine.sampler import TokenLogprobs
from tandem.engine.scheduler import Scheduler, SchedulerOutput
from tandem.engine.spec_decode.proposer import SpecDecoding
from tandem.engine.structured_output import backends
from tandem.engine.structured_output.params import StructuredOutputsConfig
from tandem.utils import cdiv

logger = logging.getLogger(__name__)
GRAMMAR_WAIT = 0.02  # seconds an engine with only grammar-waiting requests sleeps per step


@dataclass(slots=True)
class StepOutput:
    """One request's news from a step: its new token (if any) and whether it finished, with
    the token's logprobs when the request asks for them. `error`: the request failed (its
    step raised); it is finished, aborted, its blocks free."""

    request: Request
    new_token_ids: list[int]
    finished: bool
    logprobs: list[TokenLogprobs] | None = None
    # with the first token of a request asking for them: each prompt token's after the first
    prompt_logprobs: list[TokenLogprobs] | None = None
    error: str | None = None
    pooled: torch.Tensor | None = None  # a pooling request's output (float32, CPU)


def is_worker_fault(e: BaseException) -> bool:
    """Whether an exception raised by a step is the worker's own (out of memory, a broken
    device), which ends it, rather than something about the requests in the step."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        sign in text for sign in ("CUDA error", "CUBLAS_STATUS", "device-side assert", "NCCL")
    )


class EngineCore:
    """The inference core shared by every way of running Tandem."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.runner = ModelRunner(config.model, config.cache,
                                  config.scheduler.max_num_batched_tokens,
                                  config.scheduler.max_num_seqs, config.lora)  # fmt: skip
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
        max_loras = config.lora.max_loras if config.lora else None
        self.scheduler = Scheduler(config.scheduler, self.kv, info.max_model_len,
                                   max_loras=max_loras)  # fmt: skip
        self.grammars = self.runner.grammars
        self.num_steps = 0
        self.num_prefill_tokens = 0  # prompt (and recomputed) tokens computed, all steps
        self.last_batch_size = 0  # requests in the latest step
        self.spec = SpecDecoding(config.speculative, self.runner) if config.speculative else None

    def add_request(self, request: Request) -> None:
        """Validate against the engine's limits and queue. Raises ValueError on bad input."""
        self.check_request(request)
        self.scheduler.add_request(request)
        self.grammars.start(request)

    def check_request(self, request: Request) -> None:
        """ValueError naming what in the request this engine cannot run: token ids outside
        its vocabulary (prompt, output so far, sampling parameters), forks that clash."""
        if request.eos_token_id is None:
            request.eos_token_id = self.eos_token_id
        vocab = self.runner.info.vocab_size
        for name, ids in (
            ("prompt", request.prompt_token_ids),
            ("output", request.output_token_ids),
        ):
            if any(not 0 <= t < vocab for t in ids):
                raise ValueError(f"{name} token ids must be in [0, {vocab})")
        request.sampling_params.check_vocab(vocab)
        if request.lora_name is not None:
            lora = self.runner.lora
            if lora is None:
                raise ValueError("LoRA adapters are not enabled here (--enable-lora)")
            if request.lora_name not in lora.paths:
                if request.lora_path is None:
                    raise ValueError(f"LoRA adapter {request.lora_name!r} is not loaded")
                # read when a step needs it (on the engine's thread); checked here: this
                # may run on another thread (a decode worker's hand-off), so it only reads
                check_adapter(request.lora_name, request.lora_path, lora.config.max_lora_rank,
                              lora.num_layers)  # LoRAError is a ValueError  # fmt: skip
        so = request.sampling_params.structured_outputs
        if so is not None and so.backend == "auto":  # not checked upstream (offline use)
            request.sampling_params = dataclasses.replace(
                request.sampling_params,
                structured_outputs=backends.check(so, StructuredOutputsConfig()),
            )
        self._check_pooling(request)
        ids = (request.request_id, *request.fork_ids)
        if len(set(ids)) != len(ids):
            raise ValueError("fork ids must differ from each other and from the request's")
        for request_id in ids:
            if request_id in self.scheduler.requests:
                raise ValueError(f"duplicate request_id {request_id!r}")

    def _check_pooling(self, request: Request) -> None:
        """A pooling request needs a pooling model (and a generation request a generating
        one); a prompt that must run whole must fit one step."""
        pooling = request.sampling_params.pooling
        pooler = self.runner.pooler
        if pooling is None:
            if pooler is not None:
                raise ValueError("this model is a pooling model: it serves embeddings, "
                                 "scores and classifications, not generation")  # fmt: skip
            return
        if pooler is None:
            raise ValueError("this model generates: pooling requests need a pooling model "
                             "(--runner pooling)")  # fmt: skip
        if request.fork_ids or request.sampling_params.n != 1:
            raise ValueError("n must be 1 for a pooling request")
        if pooling.task in ("classify", "score") and not self.runner.is_classifier:
            raise ValueError(f"task {pooling.task} needs a classification model")
        hidden = self.runner.model.args.hidden_size
        if pooling.dimensions is not None and pooling.dimensions > hidden:
            raise ValueError(f"dimensions must be <= {hidden}, this model's embedding size")
        request.whole_prompt = needs_whole_prompt(pooler, self.runner.is_encoder)
        budget = self.config.scheduler.max_num_batched_tokens
        if request.whole_prompt and request.num_prompt_tokens > budget:
            raise ValueError(f"prompt has {request.num_prompt_tokens} tokens, more than "
                             f"max_num_batched_tokens ({budget}), which this model's pooling "
                             "needs it to fit")  # fmt: skip

    def add_prefilled_request(
        self,
        request: Request,
        kv: Sequence[torch.Tensor],
        num_computed_tokens: int,
        reused: list[Block] = (),
    ) -> bool:
        """Admit a request prefilled by another engine. Its first `num_computed_tokens`
        tokens have their KV in `reused` (leading blocks of this engine's prefix cache, on
        which the caller holds a reference) followed by the tiles in `kv`, in parts (each
        (blocks, layers, 2, Hkv, block_size, D), as `hand_off` returns, or as they came over
        the wire: never concatenated first). False when it does not fit now; nothing changed
        then. On True the caller's references on `reused` pass to the request."""
        self.check_request(request)
        if request.num_tokens > self.max_model_len:
            raise ValueError(f"{request.num_tokens} tokens; max_model_len is {self.max_model_len}")
        num_blocks = len(reused) + sum(part.shape[0] for part in kv)
        if num_blocks != cdiv(num_computed_tokens, self.kv.block_size):
            raise ValueError(f"{num_blocks} KV blocks do not hold {num_computed_tokens} tokens")
        if not self.scheduler.add_computed_request(request, num_computed_tokens, list(reused)):
            return False
        self.grammars.start(request)  # replays the tokens it has when compiled
        self.kv.pool.free(reversed(reused))  # the request holds its own references now
        block_ids, first = self.kv.block_ids(request.request_id), len(reused)
        for part in kv:
            self.runner.write_blocks(block_ids[first : first + part.shape[0]], part)
            first += part.shape[0]
        return True

    def hand_off(self, request_id: str) -> tuple[Request, torch.Tensor]:
        """Take a request that has its first token out of this engine, with the KV tiles of
        its computed tokens. Its blocks return to the pool (kept as prefix cache)."""
        request = self.scheduler.requests[request_id]
        block_ids = self.kv.block_ids(request_id)
        num_blocks = cdiv(request.num_computed_tokens, self.kv.block_size)
        kv = self.runner.read_blocks(block_ids[:num_blocks])
        self.scheduler.finish(request, RequestStatus.HANDED_OFF)
        self.runner.release([request_id])
        return request, kv

    def take_preempted(self) -> list[Request]:
        """Preempted requests leave this engine (see Scheduler.take_preempted)."""
        taken = self.scheduler.take_preempted()
        if taken:
            self.runner.release([r.request_id for r in taken])
        return taken

    def hand_back(self) -> list[Request]:
        """Take every unfinished request out of this engine, each with its tokens so far and
        its blocks freed, to continue elsewhere (a decode worker that stops)."""
        self.scheduler.preempt_all()
        return self.take_preempted()

    def abort(self, request_id: str) -> None:
        if self.scheduler.abort(request_id) is not None:
            self.runner.release([request_id])

    def abort_all(self) -> list[str]:
        """Abort every request here; their ids."""
        request_ids = list(self.scheduler.requests)
        for request_id in request_ids:
            self.abort(request_id)
        return request_ids

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
        """Schedule, run the model once, and report each request that produced a token.
        With nothing to run but requests waiting on their grammars, wait for a compile."""
        failed = self._grammar_failures()
        plan = self.scheduler.schedule()
        if plan.is_empty and self.num_waiting_for_grammar:
            self.grammars.wait(GRAMMAR_WAIT)
        return failed + self._run(plan)

    def step_plan(self, plan: dict[str, int]) -> tuple[list[StepOutput], list[str], list[str]]:
        """Run one step of a plan made elsewhere (see Scheduler.schedule_plan). Returns the
        step's outputs, the ids of planned requests that did not fit (now dropped) and of
        those that stopped short of their last token, their grammar compiling."""
        failed = self._grammar_failures()
        out = self.scheduler.schedule_plan(plan)
        if out.failed_ids:
            self.runner.release(out.failed_ids)
        return failed + self._run(out), out.failed_ids, out.deferred_ids

    @property
    def num_waiting_for_grammar(self) -> int:
        """Requests whose structured-output grammar is still compiling."""
        return sum(1 for r in self.grammars.pending.values() if r.grammar.matcher is None)

    def _grammar_failures(self) -> list[StepOutput]:
        """End the requests whose grammar failed to compile here, with the error; forget
        those whose grammar is ready or that ended. Only requests still waiting on a
        compile are looked at (`GrammarManager.pending`), not the whole batch."""
        outputs = []
        for request_id, request in list(self.grammars.pending.items()):
            grammar = request.grammar
            gone = self.scheduler.requests.get(request_id) is not request  # ended or moved
            if gone or request.is_finished or grammar.is_ready():
                del self.grammars.pending[request_id]
            elif grammar.failed:
                del self.grammars.pending[request_id]
                request.stop_reason = grammar.error
                self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
                self.runner.release([request.request_id])
                outputs.append(StepOutput(request, [], True, error=grammar.error))
        self.grammars.stats.num_waiting = len(self.grammars.pending)
        return outputs

    def _run(self, plan) -> list[StepOutput]:
        if plan.is_empty:
            return []
        num_scheduled = [plan.num_scheduled_tokens[r.request_id] for r in plan.requests]
        self.last_batch_size = len(plan.requests)
        for r, n in zip(plan.requests, num_scheduled):  # all but a decode's one new token
            last = r.num_computed_tokens + n == r.num_tokens and r.num_output_tokens > 0
            self.num_prefill_tokens += n - last
        tables = [self.kv.block_ids(r.request_id) for r in plan.requests]
        forks = self._forks(plan.requests, num_scheduled)
        try:
            sampled, logprobs, forked = self.runner.execute(
                plan.requests, num_scheduled, tables, forks, plan.spec_token_ids
            )
        except Exception as e:
            if is_worker_fault(e):
                raise
            return self._isolate_failure(plan, e)
        children = self._admit_forks(forks, forked)  # before a parent that ended is freed
        before = [r.num_output_tokens for r in plan.requests]
        finished = self.scheduler.update_from_output(plan, sampled)
        if self.spec is not None:
            self.spec.count(plan.spec_token_ids, plan.requests, sampled)
            if finished:
                self.spec.finish(finished)
            self.spec.propose(self.scheduler.running)
        pooled = [r for r in plan.requests if r.pooled is not None and not r.is_finished]
        for request in pooled:  # prefill only: done once pooled
            self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED)
            finished.append(request)
        if finished:
            self.runner.release([r.request_id for r in finished])
        self.num_steps += 1
        outputs = [
            StepOutput(
                req,
                tokens,
                req.is_finished,
                None if lp is None else (lp if isinstance(lp, list) else [lp])[: len(tokens)],
                req.prompt_logprobs if req.num_output_tokens == 1 and req.prompt_logprobs else None,
            )
            for req, tok, lp, n in zip(plan.requests, sampled, logprobs, before)
            # a verified decode: the proposals accepted and one more, as far as it went
            for tokens in [req.output_token_ids[n:] if isinstance(tok, list) else [tok]]
            if tok is not None and tokens
        ]
        outputs += [StepOutput(r, [], True, pooled=r.pooled) for r in pooled]
        return outputs + children

    def _isolate_failure(self, plan: SchedulerOutput, e: Exception) -> list[StepOutput]:
        """A step raised: find the requests it concerns by running each of them alone (their
        KV slots are only rewritten with the same values), and end those that fail again
        with the error. The others go on as if the step had succeeded."""
        if len(plan.requests) == 1:
            request = plan.requests[0]
            logger.exception("request %s failed in a step", request.request_id)
            request.stop_reason = f"the engine failed on this request: {type(e).__name__}: {e}"
            self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
            self.runner.release([request.request_id])
            return [StepOutput(request, [], True, error=request.stop_reason)]
        logger.warning("a step of %d requests failed (%s): running each alone",
                       len(plan.requests), e)  # fmt: skip
        outputs = []
        for request in plan.requests:
            if request.is_finished:
                continue
            alone = SchedulerOutput(
                {request.request_id: plan.num_scheduled_tokens[request.request_id]}, [request]
            )
            outputs += self._run(alone)
        return outputs

    def _forks(self, requests: list[Request], num_scheduled: list[int]) -> dict[int, list]:
        """Requests (by index) whose prompt completes this step and that fork: their samples
        2..n, sampled from the same logits row."""
        forks = {}
        for i, (r, n) in enumerate(zip(requests, num_scheduled)):
            if r.fork_ids and r.num_computed_tokens + n == r.num_tokens:
                forks[i] = [r.fork(fid, j) for j, fid in enumerate(r.fork_ids, 1)]
                if r.grammar is not None:  # each sample its own matcher, from the same state
                    for child in forks[i]:
                        child.grammar = r.grammar.fork()
        return forks

    def _admit_forks(self, forks: dict[int, list], forked: dict[str, tuple]) -> list[StepOutput]:
        """Each fork joins the batch with its first token, sharing its parent's full prompt
        blocks and a copy of the partial last one; with no room for that copy it waits and
        is recomputed (its prompt then hits the prefix cache)."""
        outputs = []
        for children in forks.values():
            parent = self.scheduler.requests[children[0].parent_id]
            parent.fork_ids = ()
            num_prompt = parent.num_prompt_tokens
            blocks = self.kv.req_to_blocks[parent.request_id]
            num_full = num_prompt // self.kv.block_size
            for child in children:
                token, lp = forked[child.request_id]
                child.append_output_token(token)
                if child.grammar is not None:
                    child.grammar.accept(token)
                if self.scheduler.add_computed_request(child, num_prompt, blocks[:num_full]):
                    if num_full < len(blocks) and num_prompt % self.kv.block_size:
                        src = blocks[num_full].block_id
                        dst = self.kv.req_to_blocks[child.request_id][num_full].block_id
                        self.runner.copy_block(src, dst)
                else:
                    self.scheduler.add_request(child)
                status = self.scheduler.check_stop(child, token)
                if status is not None:
                    self.scheduler.finish(child, status)
                    self.runner.release([child.request_id])
                outputs.append(
                    StepOutput(child, [token], child.is_finished, None if lp is None else [lp])
                )
        return outputs

    def reset_prefix_cache(self) -> bool:
        return self.kv.reset_prefix_cache()
