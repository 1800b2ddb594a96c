"""LLM: the in-process engine, like `vllm.LLM`. Used offline, in tests and as a baseline."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence

import torch

from tandem.engine.args import default_max_num_batched_tokens
from tandem.engine.args import speculative_config as speculative_config_of
from tandem.engine.config import (
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    SchedulerConfig,
    SchedulingPolicy,
)
from tandem.engine.core import EngineCore
from tandem.engine.lora import LoRARequest
from tandem.engine.pooling import PoolingParams
from tandem.engine.request import (
    CompletionOutput,
    PoolingRequestOutput,
    Request,
    RequestOutput,
    RequestStatus,
    SamplingParams,
)
from tandem.engine.tokenizer import IncrementalDetokenizer, load_tokenizer

Prompt = str | list[int]


class LLM:
    """Generate for a list of prompts (text or token ids) with continuous batching."""

    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,  # 2048; 8192 for a pooling model
        block_size: int = 16,
        num_gpu_blocks_override: int | None = None,
        enable_prefix_caching: bool = True,
        scheduling_policy: str = "fcfs",
        seed: int = 0,
        logprobs_mode: str = "raw_logprobs",
        logits_processors: Sequence[str] = (),
        enforce_eager: bool = False,
        runner: str = "auto",
        convert: str = "auto",
        pooler_config: str | None = None,
        kv_cache_dtype: str = "auto",
        calculate_kv_scales: bool = False,
        speculative_config: dict | None = None,
        enable_lora: bool = False,
        max_loras: int = 1,
        max_lora_rank: int = 16,
        max_cpu_loras: int | None = None,
    ) -> None:
        config = EngineConfig(
            model=ModelConfig(
                model,
                dtype,
                max_model_len,
                seed,
                logprobs_mode,
                tuple(logits_processors),
                enforce_eager,
                runner=runner,
                convert=convert,
                pooler_config=pooler_config,
            ),  # fmt: skip
            cache=CacheConfig(
                block_size,
                num_gpu_blocks_override,
                enable_prefix_caching=enable_prefix_caching,
                cache_dtype=kv_cache_dtype,
                calculate_kv_scales=calculate_kv_scales,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs,
                max_num_batched_tokens or default_max_num_batched_tokens(model, runner, convert),
                SchedulingPolicy(scheduling_policy),
            ),
            speculative=speculative_config_of(speculative_config),
            lora=LoRAConfig(max_loras, max_lora_rank, max_cpu_loras) if enable_lora else None,
        )
        self.engine = EngineCore(config)
        self.tokenizer = load_tokenizer(model)
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        priority: Sequence[int] | None = None,
        use_tqdm: bool = False,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the prompts' order. With
        `use_tqdm`, a bar of output tokens (out of every request's max_tokens) on stderr when
        it is a terminal. `lora_request`: the adapter of every prompt, or one per prompt (an
        adapter not seen before is read from its lora_path)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError("sampling_params must be one per prompt")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            lora_request = [lora_request] * len(prompts)
        for lora in {r for r in lora_request if r is not None}:
            manager = self.engine.runner.lora
            if manager is not None and lora.lora_name not in manager.paths:
                manager.add(lora.lora_name, lora.lora_path)
        order, detoks, texts, logprobs = [], {}, {}, {}
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            text = prompt if isinstance(prompt, str) else None
            rid = f"llm-{next(self._ids)}"
            fork_ids = tuple(f"{rid}.{j}" for j in range(1, params.n))
            req = Request(rid, ids, params, priority=priority[i] if priority else 0)
            req.fork_ids = fork_ids
            if lora_request[i] is not None:
                req.lora_name = lora_request[i].lora_name
            self.engine.add_request(req)
            order.append(req)
            texts[req.request_id] = text
            for sample_id in (rid, *fork_ids):
                detoks[sample_id] = IncrementalDetokenizer(
                    self.tokenizer,
                    params.stop,
                    params.include_stop_str_in_output,
                    skip_special_tokens=params.skip_special_tokens,
                )
                if params.logprobs is not None:
                    logprobs[sample_id] = []
        samples: dict[str, Request] = {}
        bar = _token_bar(sampling_params) if use_tqdm else None
        while self.engine.has_unfinished:
            for out in self.engine.step():
                samples[out.request.request_id] = out.request
                if bar is not None:
                    bar.update(len(out.new_token_ids))
                    if out.finished:  # stopped early: its unused budget counts as done
                        max_tokens = out.request.sampling_params.max_tokens
                        bar.update(max_tokens - len(out.request.output_token_ids))
                detok = detoks[out.request.request_id]
                detok.add_tokens(out.new_token_ids, out.finished)
                if out.logprobs:
                    logprobs[out.request.request_id] += out.logprobs
                if detok.stopped_on is not None and not out.finished:
                    out.request.stop_reason = detok.stopped_on
                    self.engine.finish(out.request.request_id, RequestStatus.FINISHED_STOPPED)
        if bar is not None:
            bar.close()
        return [self._output(r, samples, detoks, texts[r.request_id], logprobs) for r in order]

    def encode(
        self,
        prompts: Prompt | Sequence[Prompt],
        pooling_params: PoolingParams | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> list[PoolingRequestOutput]:
        """A pooling model's outputs, one per prompt in order (vLLM's LLM.encode): embeddings
        by default (`pooling_params.task`). Text is tokenized as the tokenizer does
        (special tokens added: an encoder's [CLS] ... [SEP])."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = SamplingParams(max_tokens=1, pooling=pooling_params or PoolingParams())
        order = []
        for prompt in prompts:
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            if truncate_prompt_tokens is not None:
                ids = ids[-truncate_prompt_tokens:]
            req = Request(f"llm-{next(self._ids)}", ids, params)
            self.engine.add_request(req)
            order.append(req)
        done: dict[str, torch.Tensor] = {}
        while self.engine.has_unfinished:
            for out in self.engine.step():
                if out.error is not None:
                    raise RuntimeError(out.error)
                if out.pooled is not None:
                    done[out.request.request_id] = out.pooled
        return [PoolingRequestOutput(r.request_id, r.prompt_token_ids, done[r.request_id],
                                     max(r.num_cached_tokens, 0)) for r in order]  # fmt: skip

    def embed(self, prompts, truncate_prompt_tokens: int | None = None, **pooling):
        """Embeddings (vLLM's LLM.embed): `encode` with task embed."""
        params = PoolingParams(task="embed", **pooling)
        return self.encode(prompts, params, truncate_prompt_tokens)

    @staticmethod
    def _output(
        req: Request, samples: dict[str, Request], detoks, prompt: str | None, logprobs
    ) -> RequestOutput:
        ids = [req.request_id, *(f"{req.request_id}.{j}" for j in range(1, req.sampling_params.n))]
        completions = [
            CompletionOutput(
                j,
                detoks[sid].text,
                list(samples[sid].output_token_ids),
                samples[sid].status.finish_reason,
                samples[sid].stop_reason,
                logprobs.get(sid),
            )
            for j, sid in enumerate(ids)
        ]
        return RequestOutput(
            req.request_id,
            req.prompt_token_ids,
            completions,
            True,
            max(req.num_cached_tokens, 0),
            prompt,
            [None, *req.prompt_logprobs]
            if req.sampling_params.prompt_logprobs is not None
            else None,
        )


def _token_bar(sampling_params: Sequence[SamplingParams]):
    """Output tokens out of the most the requests may produce; off where stderr is not a TTY."""
    from tqdm import tqdm

    total = sum(p.max_tokens * p.n for p in sampling_params)
    return tqdm(total=total, desc="generating", unit="tok", file=sys.stderr, disable=None,
                leave=False)  # fmt: skip
