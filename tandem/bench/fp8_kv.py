"""`tandem bench serve --workload fp8-kv`: what an FP8 KV cache buys, against the model's dtype.

Two clusters, one after the other, alike but for `--kv-cache-dtype` (auto, then fp8), each
worker with the same small `--cpu-kv-cache-space` (KV_SPACE_GIB: about 87 blocks of 16
tokens of SmolLM2 in bf16) so that both limits show within a short load:

- KV bytes per hand-off: `--fp8-long-prompts` prompts of `--long-input-len` tokens (the
  interference workload's long prompts), the cluster's KV transfer bytes from `/stats`.
- sequences admitted before the first preemption: `--fp8-seqs` requests at once, each of
  `--fp8-seq-prompt-len` prompt tokens and `--fp8-seq-output-len` output tokens (a long prompt
  against its growth, so that the cache fills with admitted prompts before it fills with their
  outputs); the most the decode worker ran at one time before its preemption counter moved
  (its heartbeats, polled from `/stats`), the median of `--rounds` loads. The decode worker's
  blocks are twice as many with fp8; the sequences admitted fall a little short of twice
  because the outputs of those admitted first grow while the rest are prefilled.

Then in this process, on the same model and no server running: one decode step at batch
`--fp8-batch` with `--fp8-context` tokens of context each (a cache of random values: a step
costs the same whatever they are), the whole model and its attention alone, the two cache
types alternated `--rounds` times (at least 5); the medians' ratio. And the accuracy cost,
in the model's dtype: 32 prompts x 128 greedy tokens against the 16-bit cache's, and the
mean absolute logprob difference on the 16-bit run's text.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx
import torch

from tandem.bench.load import ServerInfo, client, random_prompts, send_request

KV_SPACE_GIB = 0.06
_CLUSTER = ["--cpu-kv-cache-space", str(KV_SPACE_GIB), "--max-model-len", "1152"]
DEPLOYMENTS = {"auto": [*_CLUSTER, "--kv-cache-dtype", "auto"],
               "fp8": [*_CLUSTER, "--kv-cache-dtype", "fp8"]}  # fmt: skip


def add_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--fp8-long-prompts", type=int, default=4)
    g.add_argument("--fp8-seqs", type=int, default=24, help="requests sent at once")
    g.add_argument("--fp8-seq-prompt-len", type=int, default=400)
    g.add_argument("--fp8-seq-output-len", type=int, default=200)
    g.add_argument("--fp8-batch", type=int, default=16)
    g.add_argument("--fp8-context", type=int, default=2048)


def _stats(url: str) -> dict:
    return httpx.get(f"{url}/stats", timeout=10).json()


async def _kv_bytes_per_request(url: str, prompts: list[list[int]]) -> float:
    before = _stats(url)["kv_transfer"]
    async with client(url, len(prompts)) as http:
        results = await asyncio.gather(*(send_request(http, p, 8) for p in prompts))
    if not all(r.ok for r in results):
        raise RuntimeError(f"long prompts failed: {[r.error for r in results if not r.ok]}")
    deadline = time.monotonic() + 30
    while True:  # the prefill worker's counters arrive with its heartbeats
        after = _stats(url)["kv_transfer"]
        done = after["num_transfers"] - before["num_transfers"]
        if done >= len(prompts) or time.monotonic() > deadline:
            return (after["bytes"] - before["bytes"]) / max(done, 1)
        await asyncio.sleep(0.2)


async def _admitted_before_preemption(url: str, prompts: list[list[int]], length: int) -> int:
    """Send every prompt at once; the most sequences the decode workers held together up to
    the step of the first preemption (read from their heartbeats, one per step)."""

    def decode_workers() -> list[dict]:
        return [w for w in _stats(url)["workers"].values() if w["role"] == "decode"]

    preempted = sum(w["num_preemptions"] for w in decode_workers())
    most = 0
    async with client(url, len(prompts)) as http:
        load = asyncio.gather(*(send_request(http, p, length) for p in prompts))
        task = asyncio.ensure_future(load)
        while not task.done():
            workers = await asyncio.to_thread(decode_workers)
            running = sum(w["num_running"] for w in workers)
            new = sum(w["num_preemptions"] for w in workers) - preempted
            # the step that preempted ran its victims too: they were admitted
            most = max(most, running + new)
            if new:
                break
            await asyncio.sleep(0.02)
        await task
    return most


def run(name: str, url: str, info: ServerInfo, args: argparse.Namespace) -> dict:
    workers = _stats(url)["workers"]
    blocks = {k: w["num_blocks"] for k, w in workers.items()}
    long = random_prompts(args.fp8_long_prompts, args.long_input_len, info.vocab_size, args.seed)
    kv_bytes = asyncio.run(_kv_bytes_per_request(url, long))
    tries = []
    for i in range(args.rounds):  # distinct prompts each time: no prefix cache hits
        seqs = random_prompts(args.fp8_seqs, args.fp8_seq_prompt_len, info.vocab_size,
                              args.seed + 1 + i)  # fmt: skip
        tries.append(asyncio.run(_admitted_before_preemption(url, seqs, args.fp8_seq_output_len)))
    admitted = statistics.median(tries)
    print(f"{name}: {blocks} KV blocks; {kv_bytes / 2**20:.2f} MiB of KV per hand-off of "
          f"{args.long_input_len} tokens; {admitted} sequences admitted before the first "
          f"preemption (median of {tries})")  # fmt: skip
    return {"num_blocks": blocks, "kv_bytes_per_request": kv_bytes, "max_seqs": admitted,
            "max_seqs_tries": tries}  # fmt: skip


def _decode_step_times(model_dir: str | None, args: argparse.Namespace) -> dict[str, dict]:
    """Median whole-step and attention-only times (ms) per cache type, alternated."""
    from tandem.engine.attention import build_attn_metadata, paged_attention
    from tandem.engine.config import CacheConfig, ModelConfig
    from tandem.engine.kv_quant import quantize
    from tandem.engine.model_runner import ModelRunner
    from tandem.model_prep import default_model_dir

    model_dir = model_dir or str(default_model_dir())
    batch, context, bs = args.fp8_batch, args.fp8_context, 16
    per_seq = -(-context // bs)
    runners = {}
    for kind in ("auto", "fp8"):
        cache = CacheConfig(num_gpu_blocks_override=batch * per_seq + 1, cache_dtype=kind)
        runner = ModelRunner(ModelConfig(model_dir, max_model_len=context), cache, 2048, batch)
        g = torch.Generator().manual_seed(0)
        for k, v in runner.kv_caches:  # values as a model's: roughly unit scale
            for t in (k, v):
                wide = torch.randn(t.shape, generator=g)
                t.copy_(quantize(wide, 1.0, t.dtype) if t.dtype.itemsize == 1 else wide)
        runners[kind] = runner
    tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(batch)]
    times: dict[str, dict[str, list[float]]] = {k: {"step": [], "attention": []} for k in runners}
    for _ in range(max(args.rounds, 5)):
        for kind, runner in runners.items():
            model, device = runner.model, runner.device
            attn = model.layers[0].self_attn
            ids = torch.randint(0, 1000, (batch,))
            pos = torch.full((batch,), context - 1)
            with torch.inference_mode():
                meta = build_attn_metadata([1] * batch, [context] * batch, tables, bs, device,
                                           allow_triton=False)  # fmt: skip
                start = time.perf_counter()
                model(ids, pos, meta, runner.kv_caches)
                times[kind]["step"].append(time.perf_counter() - start)
                q = torch.randn(batch, attn.num_heads, attn.head_dim, dtype=runner.dtype)
                kv = torch.randn(batch, attn.num_kv_heads, attn.head_dim, dtype=runner.dtype)
                meta = build_attn_metadata([1] * batch, [context] * batch, tables, bs, device,
                                           allow_triton=False)  # fmt: skip
                start = time.perf_counter()
                for k_cache, v_cache in runner.kv_caches:
                    paged_attention(q, kv, kv, k_cache, v_cache, meta, attn.scale)
                times[kind]["attention"].append(time.perf_counter() - start)
    return {
        kind: {what: 1000 * statistics.median(v) for what, v in t.items()}
        for kind, t in times.items()
    }


TOPICS = ["a lighthouse keeper", "the water cycle", "a chess opening", "bread baking",
          "the moons of Jupiter", "a city bus route", "honeybees", "the printing press",
          "a mountain railway", "tides", "a violin maker", "volcanoes", "a night market",
          "glaciers", "the first telephone", "a desert oasis", "paper folding", "comets",
          "a fishing village", "the human heart", "a robot gardener", "coral reefs",
          "a winter festival", "the speed of sound", "a lost umbrella", "wind turbines",
          "an old library", "rainbows", "a bicycle repair shop", "the Silk Road",
          "a thunderstorm", "sourdough"]  # fmt: skip


def _accuracy(model_dir: str | None, num_tokens: int) -> dict[str, dict]:
    """Against the model's-dtype cache, in that dtype: greedy tokens equal before each
    prompt's first difference (over all tokens), and the mean absolute difference of the
    logprobs the two caches give the 16-bit run's own greedy text (teacher-forced)."""
    from tandem.engine.llm import LLM
    from tandem.engine.request import SamplingParams
    from tandem.model_prep import default_model_dir

    model_dir = model_dir or str(default_model_dir())
    prompts = [f"Write a few sentences about {t}." for t in TOPICS]
    greedy = SamplingParams(max_tokens=num_tokens, temperature=0, ignore_eos=True)
    scored = SamplingParams(max_tokens=1, prompt_logprobs=0)
    out, texts = {}, None
    for kind in ("auto", "fp8", "fp8_e5m2"):
        llm = LLM(model_dir, kv_cache_dtype=kind, max_model_len=1024, num_gpu_blocks_override=512)
        ids = [llm.tokenizer.encode(p) for p in prompts]
        tokens = [o.outputs[0].token_ids for o in llm.generate(ids, greedy)]
        texts = texts or [i + t for i, t in zip(ids, tokens)]  # the 16-bit run's
        logprobs = [[lp.logprob for lp in o.prompt_logprobs[len(i):]]
                    for o, i in zip(llm.generate(texts, scored), ids)]  # fmt: skip
        out[kind] = {"tokens": tokens, "logprobs": logprobs}
        del llm
    base = out.pop("auto")
    result = {}
    for kind, r in out.items():
        same = sum(next((n for n, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                   for x, y in zip(base["tokens"], r["tokens"]))  # fmt: skip
        diffs = [abs(a - b) for x, y in zip(base["logprobs"], r["logprobs"]) for a, b in zip(x, y)]
        result[kind] = {"greedy_prefix_agreement": same / (len(prompts) * num_tokens),
                        "mean_abs_logprob_diff": statistics.fmean(diffs)}  # fmt: skip
    return result


def report(runs: dict[str, dict], args: argparse.Namespace) -> tuple[dict, bool]:
    auto, fp8 = runs["auto"], runs["fp8"]
    steps = _decode_step_times(args.model, args)
    accuracy = _accuracy(args.model, 128)
    result = {
        "kv_bytes_ratio": fp8["kv_bytes_per_request"] / auto["kv_bytes_per_request"],
        "max_seqs_ratio": fp8["max_seqs"] / max(auto["max_seqs"], 1),
        "long_context_step_ratio": steps["fp8"]["step"] / steps["auto"]["step"],
        "long_context_attention_ratio": steps["fp8"]["attention"] / steps["auto"]["attention"],
        "decode_step_ms": steps,
        "accuracy": accuracy,
        "workload": {"kv_space_gib": KV_SPACE_GIB, "long_input_len": args.long_input_len,
                     "seqs": args.fp8_seqs, "seq_prompt_len": args.fp8_seq_prompt_len,
                     "seq_output_len": args.fp8_seq_output_len,
                     "batch": args.fp8_batch, "context": args.fp8_context,
                     "rounds": max(args.rounds, 5), "torch_threads": torch.get_num_threads()},
        "deployments": runs,
    }  # fmt: skip
    print(f"{'=' * 20} fp8 KV cache against auto {'=' * 20}")
    print(f"KV bytes per hand-off:   {result['kv_bytes_ratio']:.3f}  (target <= 0.55)")
    print(f"sequences admitted:      {fp8['max_seqs']} / {auto['max_seqs']} = "
          f"{result['max_seqs_ratio']:.2f}  (target >= 1.9)")  # fmt: skip
    print(
        f"decode step, batch {args.fp8_batch} at {args.fp8_context} tokens (in-process, "
        f"{torch.get_num_threads()} threads): {steps['fp8']['step']:.1f} / "
        f"{steps['auto']['step']:.1f} ms = {result['long_context_step_ratio']:.3f}  "
        f"(target <= 1.0); attention alone {steps['fp8']['attention']:.1f} / "
        f"{steps['auto']['attention']:.1f} ms = {result['long_context_attention_ratio']:.3f}"
    )
    for kind, a in accuracy.items():
        print(f"{kind} against auto, {len(TOPICS)} prompts x 128 greedy tokens: tokens equal "
              f"before the first difference {a['greedy_prefix_agreement']:.1%}; mean |logprob "
              f"difference| on the auto run's text {a['mean_abs_logprob_diff']:.4f}")  # fmt: skip
    return result, True
