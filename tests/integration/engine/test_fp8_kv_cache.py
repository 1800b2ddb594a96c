"""An FP8 KV cache on the default model, against the same engine with a 16-bit one
(docs/fp8-kv-cache.md has the figures these bounds come from). Perplexity of a fixed text,
prefilled in chunks so that every chunk after the first reads the fp8 cache back; greedy
generations, which read it at every decode step; scales measured at start-up."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tandem.engine.llm import LLM
from tandem.engine.request import SamplingParams

TEXT = Path(__file__).parents[2] / "data" / "perplexity.txt"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land",
           "The three laws of robotics are", "Water boils at", "A list of prime numbers:",
           "The best way to learn a language is", "In 1969, the first"]  # fmt: skip
NUM_TOKENS = 24


def _run(model: str, kv_cache_dtype: str, **kwargs) -> tuple[float, list[list[int]], LLM]:
    llm = LLM(model, dtype="float32", kv_cache_dtype=kv_cache_dtype, max_model_len=1024,
              num_gpu_blocks_override=256, max_num_batched_tokens=256, **kwargs)  # fmt: skip
    ids = llm.tokenizer.encode(TEXT.read_text())[:1024]
    scored = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    logprobs = [p.logprob for p in scored.prompt_logprobs if p is not None]
    ppl = math.exp(-sum(logprobs) / len(logprobs))
    greedy = SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True)
    tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy)]
    return ppl, tokens, llm


@pytest.fixture(scope="module")
def baseline(default_model):
    ppl, tokens, _ = _run(default_model, "auto")
    return ppl, tokens


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Tokens equal up to each pair's first difference, over all tokens."""
    same = 0
    for x, y in zip(a, b):
        same += next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), len(x))
    return same / sum(len(x) for x in a)


def test_e4m3_perplexity_is_within_2_percent_of_the_16_bit_cache(default_model, baseline):
    ppl, tokens, llm = _run(default_model, "fp8")
    runner = llm.engine.runner
    assert str(runner.kv_caches[0][0].dtype) == "torch.float8_e4m3fn"
    assert runner.kv_scales == [1.0] * len(runner.kv_scales)  # the checkpoint has none
    print(f"e4m3: perplexity {ppl:.3f} against {baseline[0]:.3f}; "
          f"greedy prefix agreement {_agreement(baseline[1], tokens):.2f}")  # fmt: skip
    assert abs(ppl / baseline[0] - 1) < 0.02
    assert _agreement(baseline[1], tokens) > 0.5


def test_e5m2_and_measured_scales(default_model, baseline):
    ppl, _, _ = _run(default_model, "fp8_e5m2")
    print(f"e5m2: perplexity {ppl:.3f} against {baseline[0]:.3f}")
    assert abs(ppl / baseline[0] - 1) < 0.06  # two mantissa bits: measured +3.2%
    ppl, _, llm = _run(default_model, "fp8", calculate_kv_scales=True)
    scales = llm.engine.runner.kv_scales
    print(f"e4m3, measured scales: perplexity {ppl:.3f}; K {scales[0::2][:4]}...")
    assert len(set(scales)) > 2 and all(0 < s < 1 for s in scales)
    assert abs(ppl / baseline[0] - 1) < 0.03


def test_scales_in_the_checkpoint_are_read_and_used(tiny_llama, tmp_path):
    """k_scale / v_scale tensors under vLLM's names are the cache's scales (and not loaded as
    weights); a model without them gets 1.0."""
    import shutil

    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "with-scales"
    shutil.copytree(tiny_llama, folder)
    scales = {"model.layers.0.self_attn.k_scale": torch.tensor(0.5),
              "model.layers.0.self_attn.v_scale": torch.tensor(0.25),
              "model.layers.1.self_attn.k_proj.k_scale": torch.tensor([0.125]),
              "model.layers.1.self_attn.v_proj.v_scale": torch.tensor(2.0)}  # fmt: skip
    save_file(scales, str(folder / "kv-scales.safetensors"))
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    llm = LLM(str(folder), dtype="float32", kv_cache_dtype="fp8", num_gpu_blocks_override=64,
              max_model_len=128)  # fmt: skip
    assert llm.engine.runner.kv_scales == [0.5, 0.25, 0.125, 2.0]
    assert len(llm.generate([[5, 6, 7]], greedy)[0].outputs[0].token_ids) == 8
    plain = LLM(tiny_llama, dtype="float32", kv_cache_dtype="fp8", num_gpu_blocks_override=64,
                max_model_len=128)  # fmt: skip
    assert plain.engine.runner.kv_scales == [1.0] * 4
