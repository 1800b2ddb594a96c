"""`tandem bench offline`: the engine against Hugging Face `generate`, same process, same prompts.

Both sides get the same distinct random-token prompts and produce exactly `output_len`
tokens (EOS ignored: `ignore_eos` here, `min_new_tokens` for HF). HF runs a static batch in
fp32 and in bf16 (best of the two counts); every side is warmed up before its timed run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from tandem.bench import progress
from tandem.engine.llm import LLM
from tandem.engine.request import SamplingParams


@dataclass(frozen=True, slots=True)
class OfflineBenchArgs:
    model: str
    num_prompts: int = 32
    input_len: int = 128
    output_len: int = 128
    dtype: str = "auto"
    seed: int = 0
    skip_hf: bool = False
    json_path: str | None = None


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Distinct random-token prompts (no shared prefix, so no accidental cache hits)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab - 10, (length,), generator=gen).tolist() for _ in range(n)]


def measure_copy_bandwidth(num_bytes: int = 256 * 2**20) -> float:
    """Bytes per second moved by a large tensor copy, read plus write (STREAM's Copy)."""
    src = torch.empty(num_bytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * num_bytes / best


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every linear layer (as it multiplies: the
    CPU-transposed copy where there is one) and the norms; of the embedding only a row."""
    from tandem.engine.models.layers import Linear

    tensors = []
    for m in model.modules():
        if isinstance(m, Linear):
            tensors += [t for t in (m.weight_t if m.weight_t is not None else m.weight, m.bias)
                        if t is not None]  # fmt: skip
        elif not isinstance(m, torch.nn.Embedding):
            tensors += list(m.parameters(recurse=False))
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_engine(llm: LLM, prompts: list[list[int]], output_len: int) -> float:
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
    llm.engine.reset_prefix_cache()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - t
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == len(prompts) * output_len, produced
    return produced / elapsed


def decode_step_ms_batch1(llm: LLM, steps: int = 32) -> float:
    """Median time of one decode step with a single running request."""
    from tandem.engine.request import Request

    core = llm.engine
    req = Request(
        "bench-b1", [11, 12, 13, 14], SamplingParams(max_tokens=steps + 8, ignore_eos=True)
    )
    core.add_request(req)
    core.step()  # prefill
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - t)
    core.abort(req.request_id)
    return sorted(times)[len(times) // 2] * 1e3


class _TokenCounter:
    """HF generate's streamer (its `put` and `end`): moves a bar by each step's new tokens.
    The prompt comes first (2-D), then one token per sequence per step (1-D)."""

    def __init__(self, bar) -> None:
        self.bar = bar

    def put(self, value: torch.Tensor) -> None:
        if value.dim() == 1:
            self.bar.update(value.numel())

    def end(self) -> None:
        pass


def bench_hf(
    model_dir: str, prompts: list[list[int]], output_len: int, dtype: torch.dtype
) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    kw = dict(do_sample=False, pad_token_id=model.config.eos_token_id)
    with torch.inference_mode():
        model.generate(
            ids[:2, :16], attention_mask=mask[:2, :16], max_new_tokens=8, min_new_tokens=8, **kw
        )
        with progress.bar(len(prompts) * output_len, f"hf generate ({dtype})", "tok") as bar:
            streamer = None if bar.disable else _TokenCounter(bar)  # no bar: nothing added
            t = time.perf_counter()
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len,
                streamer=streamer, **kw,
            )  # fmt: skip
            elapsed = time.perf_counter() - t
    produced = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    assert produced == len(prompts) * output_len, produced
    return produced / elapsed


def run(args: OfflineBenchArgs) -> dict:
    print(
        f"# torch threads: {torch.get_num_threads()} (one process; engine and HF run "
        f"one after the other on the same cores)"
    )
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=max(args.num_prompts, 1))
    vocab = llm.engine.runner.info.vocab_size
    prompts = random_prompts(args.num_prompts, args.input_len, vocab, args.seed)
    engine_tok_s = bench_engine(llm, prompts, args.output_len)
    print(
        f"engine ({llm.engine.runner.dtype}): {engine_tok_s:.1f} output tok/s "
        f"({args.num_prompts} prompts x {args.input_len} in + {args.output_len} out)"
    )
    step_ms = decode_step_ms_batch1(llm)
    weight_bytes = model_weight_bytes(llm.engine.runner.model)
    bandwidth = measure_copy_bandwidth()
    bound_ms = weight_bytes / bandwidth * 1e3
    print(
        f"decode step at batch 1: {step_ms:.2f} ms; bandwidth bound {bound_ms:.2f} ms "
        f"({weight_bytes / 2**20:.0f} MiB of weights / {bandwidth / 1e9:.1f} GB/s copy)"
    )
    result = dict(
        engine_tok_s=engine_tok_s, decode_step_ms_batch1=step_ms, bandwidth_bound_ms=bound_ms
    )
    if not args.skip_hf:
        del llm
        hf = {}
        for dtype in (torch.float32, torch.bfloat16):
            hf[str(dtype)] = bench_hf(args.model, prompts, args.output_len, dtype)
            print(f"hf generate ({dtype}, static batch): {hf[str(dtype)]:.1f} output tok/s")
        result["hf_tok_s"] = max(hf.values())
        result["ratio"] = engine_tok_s / result["hf_tok_s"]
        print(f"ratio engine / best hf: {result['ratio']:.2f}x")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result
