"""Greedy output equals Hugging Face transformers token for token, in fp32."""

import pytest
import torch

from tandem.engine.llm import LLM
from tandem.engine.request import SamplingParams
from tests.helpers.hf import hf_greedy


@pytest.fixture(scope="module")
def hf_tiny(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def tiny_prompts():
    g = torch.Generator().manual_seed(0)
    # Lengths cross block boundaries (block size 16 below, 4 in the small-block runs).
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in (1, 5, 16, 17, 33, 47)]


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        dict(),  # defaults
        dict(max_num_batched_tokens=8, block_size=4),  # chunked prefill forced small
        # Room for the longest request (47 + 32 tokens) alone, not for all at once.
        dict(num_gpu_blocks_override=20, block_size=4, max_model_len=80),
    ],
    ids=["default", "chunked-8", "preemption"],
)
def test_tiny_models_match_hf(tiny_model, hf_tiny, engine_kwargs):
    kwargs = dict(dtype="float32", num_gpu_blocks_override=256) | engine_kwargs
    llm = LLM(tiny_model, **kwargs)
    prompts = tiny_prompts()
    outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_tiny, prompt, 32)
    if "num_gpu_blocks_override" in engine_kwargs:
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv.num_free_blocks == llm.engine.runner.info.num_blocks
    llm.engine.kv.check_integrity()


def test_tiny_models_match_hf_through_torchs_ops(tiny_model, hf_tiny, monkeypatch):
    """Where the C++ CPU kernels are not built (or on GPUs): torch's attention and norms."""
    from tandem.engine import attention
    from tandem.engine.models import layers

    for module in (attention, layers):
        monkeypatch.setattr(module, "load_cpu_kernels", lambda: False)
    llm = LLM(tiny_model, dtype="float32", num_gpu_blocks_override=256)
    prompts = tiny_prompts()
    outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_tiny, prompt, 32)


def test_prefix_cache_hit_gives_same_output(tiny_model, hf_tiny):
    llm = LLM(tiny_model, dtype="float32", num_gpu_blocks_override=256, block_size=4)
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(3, 256, (40,), generator=g).tolist()
    first = llm.generate([shared + [7, 8, 9]], SamplingParams(max_tokens=24, temperature=0))[0]
    second = llm.generate([shared + [10, 11]], SamplingParams(max_tokens=24, temperature=0))[0]
    assert second.num_cached_tokens == 40
    assert first.outputs[0].token_ids == hf_greedy(hf_tiny, shared + [7, 8, 9], 24)
    assert second.outputs[0].token_ids == hf_greedy(hf_tiny, shared + [10, 11], 24)
    # The same prompt again: everything but its last token comes from the cache.
    again = llm.generate([shared + [10, 11]], SamplingParams(max_tokens=24, temperature=0))[0]
    assert (
        again.num_cached_tokens == 40 and again.outputs[0].token_ids == second.outputs[0].token_ids
    )


def test_default_model_matches_hf(default_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(default_model)
    llm = LLM(default_model, dtype="float32", num_gpu_blocks_override=512)
    texts = [
        "The capital of France is",
        "Here is a short story about a robot who learns to paint. Once upon a time,",
        tok.apply_chat_template(
            [{"role": "user", "content": "List three uses of copper."}],
            tokenize=False,
            add_generation_prompt=True,
        ),
    ]
    prompts = [tok.encode(t) for t in texts]
    outs = llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0.0))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 40)
        assert len(out.outputs[0].token_ids) >= 32 or out.outputs[0].finish_reason == "stop"


def test_cache_smaller_than_max_model_len_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(tiny_llama, dtype="float32", num_gpu_blocks_override=8, block_size=4)


def test_bad_engine_input_raises_value_error(tiny_llama):
    llm = LLM(tiny_llama, dtype="float32", max_model_len=32, num_gpu_blocks_override=64)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([list(range(3, 40))])
    with pytest.raises(ValueError, match="prompt token ids"):
        llm.generate([[999999]])
