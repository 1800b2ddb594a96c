"""The GPU path checked on a machine with one NVIDIA GPU, stage by stage; each stage prints
its result as it ends, so a run cut off still reports. Run by scripts/gpu_check.sh, which
sets up the packages first. Figures go to $OUT/gpu_check.json (or ./gpu_check.json).

Stages: info (the card, the copy bandwidth that serves as its peak), kernels (the triton
kernel tests, for real), parity (greedy tokens equal Hugging Face's in fp32 on tiny random
models, with and without CUDA graphs; bf16 logprobs close, as vLLM's check_logprobs_close),
attention (the decode kernel's GB/s at batch 64 x 2,048 context against that peak; prefill
TFLOP/s), graphs (decode step with and without CUDA graphs, capture time and memory),
serve (`tandem bench serve` on a random model of SmolLM2's shape, 1 prefill + 1 decode
worker sharing the card, against Hugging Face `generate` at static batch 32).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

RESULTS: dict[str, object] = {}
WORK = Path(tempfile.mkdtemp(prefix="gpu_check-"))
SMOL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
            max_position_embeddings=8192, rope_theta=100000.0,
            tie_word_embeddings=True)  # fmt: skip


def report(name: str, value) -> None:
    RESULTS[name] = value
    print(f"  {name}: {value}", flush=True)
    out = Path(os.environ.get("OUT", ".")) / "gpu_check.json"
    out.write_text(json.dumps(RESULTS, indent=2, default=str))


def bench_ms(fn, warmup: int = 5, reps: int = 20) -> float:
    """Median milliseconds of `fn` on the GPU (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def smol_model() -> str:
    """A random-weight model of SmolLM2-135M's shape (its files are too large to carry),
    with the tests' tiny tokenizer."""
    path = WORK / "smol"
    if not (path / "config.json").exists():
        import transformers

        from tests.conftest import _tokenizer_for

        config = transformers.LlamaConfig(**SMOL, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(path, safe_serialization=True)
        _tokenizer_for(path)
    return str(path)


# -- stages ---------------------------------------------------------------------------------------


def info() -> None:
    import triton

    props = torch.cuda.get_device_properties(0)
    report("device", props.name)
    report("sms", props.multi_processor_count)
    report("memory_gib", round(props.total_memory / 2**30, 1))
    report("versions", {"torch": torch.__version__, "triton": triton.__version__,
                        "python": sys.version.split()[0]})  # fmt: skip
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x))
    report("copy_gb_s", round(2 * x.numel() / ms / 1e6, 1))  # read + written


def kernels() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/unit/kernels/test_triton_kernels.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    print(done.stdout[-3000:], done.stderr[-2000:])
    report("kernel_tests", "passed" if done.returncode == 0 else f"FAILED ({done.returncode})")


def parity() -> None:
    import transformers

    from tandem.engine.llm import LLM
    from tandem.engine.request import SamplingParams
    from tests.conftest import build_tiny_model
    from tests.helpers.hf import hf_greedy

    prompts = [[5 + i for i in range(40)], [9, 8, 7], [100 + i % 50 for i in range(90)]]
    for family in ("llama", "qwen2"):
        path = build_tiny_model(family, WORK / family)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        hf = hf.cuda().eval()
        with torch.no_grad():
            expected = [hf_greedy(hf, p, 24) for p in prompts]
        for eager in (False, True):
            llm = LLM(path, dtype="float32", num_gpu_blocks_override=256, max_model_len=256,
                      enforce_eager=eager)  # fmt: skip
            outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0))
            got = [o.outputs[0].token_ids for o in outs]
            name = f"parity_fp32_{family}_{'eager' if eager else 'graphs'}"
            report(name, "equal" if got == expected else f"DIFFERENT: {got} vs {expected}")
            del llm
            torch.cuda.empty_cache()
    # bf16, SmolLM2's shape: the top-5 logprobs close, as vLLM's check_logprobs_close
    path = smol_model()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
    llm = LLM(path, dtype="bfloat16", num_gpu_blocks_override=512, max_model_len=512)
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=5)
    mismatches = 0
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        ours = out.outputs[0]
        with torch.no_grad():
            gen = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=16,
                              do_sample=False, output_scores=True, return_dict_in_generate=True,
                              pad_token_id=0)  # fmt: skip
        theirs = gen.sequences[0, len(prompt) :].tolist()
        for i, (a, b) in enumerate(zip(ours.token_ids, theirs)):
            if a == b:
                continue
            hf_top = gen.scores[i][0].float().log_softmax(-1).topk(5).indices.tolist()
            if a not in hf_top or b not in ours.logprobs[i].top_ids:
                mismatches += 1
            break  # past a divergence the two continue from different texts
    report("parity_bf16_logprobs_close", "close" if mismatches == 0 else f"{mismatches} FAR")


def attention() -> None:
    from tandem.kernels.triton_attention import unified_attention

    def decode(batch, ctx, heads, kv_heads, head_dim, block=16):
        blocks_per_seq = ctx // block
        shape = (batch * blocks_per_seq + 1, kv_heads, block, head_dim)
        k = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        q = torch.randn(batch, heads, head_dim, dtype=torch.bfloat16, device="cuda")
        out = torch.empty_like(q)
        tables = torch.randperm(batch * blocks_per_seq, device="cuda").view(batch, -1)
        tables = tables.to(torch.int32)
        starts = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        ms = bench_ms(lambda: unified_attention(q, k, v, out, starts, lens, tables, 1, 0.125))
        read = 2 * batch * ctx * kv_heads * head_dim * 2
        return ms, read / ms / 1e6

    peak = RESULTS.get("copy_gb_s")
    for name, shape in (("smol", (9, 3, 64)), ("llama8b", (32, 8, 128))):
        ms, gbs = decode(64, 2048, *shape)
        share = f", {100 * gbs / peak:.0f}% of the copy bandwidth" if peak else ""
        report(f"decode_attention_{name}_b64_ctx2048", f"{ms:.3f} ms, {gbs:.0f} GB/s{share}")
    # prefill: 4 prompts of 2,048 tokens, causal, Llama-8B's heads
    seqs, length, heads, kv_heads, head_dim, block = 4, 2048, 32, 8, 128, 16
    nblocks = seqs * length // block
    k = torch.randn(nblocks, kv_heads, block, head_dim, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    q = torch.randn(seqs * length, heads, head_dim, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    tables = torch.arange(nblocks, dtype=torch.int32, device="cuda").view(seqs, -1)
    starts = torch.arange(0, seqs * length + 1, length, dtype=torch.int32, device="cuda")
    lens = torch.full((seqs,), length, dtype=torch.int32, device="cuda")
    ms = bench_ms(lambda: unified_attention(q, k, v, out, starts, lens, tables, length, 0.08))
    flops = seqs * heads * head_dim * length * (length + 1) * 2  # QK^T and PV, causal half
    report("prefill_attention_4x2048_tflops", round(flops / ms / 1e9, 1))


def graphs() -> None:
    from tandem.engine.llm import LLM
    from tandem.engine.request import SamplingParams

    path = smol_model()
    for eager in (True, False):
        llm = LLM(path, dtype="bfloat16", num_gpu_blocks_override=4096, max_model_len=1024,
                  max_num_seqs=64, enforce_eager=eager)  # fmt: skip
        g = llm.engine.runner.graphs
        if g is not None:
            report("graph_capture", f"{g.capture_seconds:.1f} s, {g.capture_bytes / 2**20:.0f} MiB")
        for batch in (1, 32):
            prompts = [[10 + i + b for i in range(32)] for b in range(batch)]
            params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
            llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0))  # warm
            torch.cuda.synchronize()
            start = time.perf_counter()
            llm.generate(prompts, params)
            ms = (time.perf_counter() - start) * 1000 / 128
            report(f"step_ms_b{batch}_{'eager' if eager else 'graphs'}", round(ms, 2))
        del llm
        torch.cuda.empty_cache()


def serve() -> None:
    path = smol_model()
    out = WORK / "serve.json"
    done = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "bench", "serve", "--model", path,
         "--num-prompts", "128", "--max-concurrency", "32", "--json", str(out),
         "--server-args", "--max-model-len 1024"],
        cwd=ROOT, capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    print(done.stdout[-2000:], done.stderr[-2000:])
    if done.returncode == 0 and out.exists():
        figures = json.loads(out.read_text())
        report("serve", {k: figures.get(k) for k in ("output_tok_s", "colocated_tok_s", "ratio",
                                                     "ttft_p50_ms", "itl_p99_ms")})  # fmt: skip
    else:
        report("serve", f"FAILED ({done.returncode})")
    hf = WORK / "offline.json"
    done = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "bench", "offline", "--model", path,
         "--num-prompts", "32", "--json", str(hf)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    print(done.stdout[-2000:], done.stderr[-2000:])
    if done.returncode == 0 and hf.exists():
        figures = json.loads(hf.read_text())
        report("offline", figures)
        cluster = RESULTS.get("serve")
        hf_tok_s = figures.get("hf_tok_s")
        if isinstance(cluster, dict) and cluster.get("output_tok_s") and hf_tok_s:
            report("cluster_over_hf_generate", round(cluster["output_tok_s"] / hf_tok_s, 2))


STAGES = {"info": info, "kernels": kernels, "parity": parity, "attention": attention,
          "graphs": graphs, "serve": serve}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stages", nargs="*", help=f"some of {', '.join(STAGES)} (default: all)")
    args = parser.parse_args()
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages: {', '.join(sorted(unknown))}")
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", flush=True)
        return 1
    failed = 0
    for name in args.stages or list(STAGES):
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            STAGES[name]()
        except Exception:
            failed += 1
            traceback.print_exc()
            report(f"{name}_error", traceback.format_exc().splitlines()[-1])
        print(f"== {name}: {time.perf_counter() - start:.1f} s", flush=True)
    print(json.dumps(RESULTS, indent=2, default=str), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
