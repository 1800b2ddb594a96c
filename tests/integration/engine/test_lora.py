"""LoRA adapters against PEFT applied to the Hugging Face model (greedy, fp32, token for
token): tiny random Llama and Qwen2 with random adapters of ranks 8 and 16 on all seven
projections, alone and in one batch with the base model and each other (every request
equals its own run alone); adapters kept apart in the prefix cache; more adapters than
--max-loras and --max-cpu-loras (slots rewritten, memory evicted, reloaded) stay exact;
bad adapters are refused with a reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tandem.engine.llm import LLM
from tandem.engine.lora import LoRARequest
from tandem.engine.lora.adapter import LoRAError
from tandem.engine.request import Request, SamplingParams
from tests.helpers.hf import hf_greedy, make_adapter

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)  # stops at EOS, as HF does


def shuffled_adapter(source: str, out, seed: int) -> str:
    """Another adapter of the same shapes: `source`'s tensors, each permuted at random."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    tensors = load_file(f"{source}/adapter_model.safetensors")
    shuffled = {k: t.flatten()[torch.randperm(t.numel(), generator=g)].view_as(t).contiguous()
                for k, t in tensors.items()}  # fmt: skip
    Path(out).mkdir()
    save_file(shuffled, f"{out}/adapter_model.safetensors")
    shutil.copy(f"{source}/adapter_config.json", out)
    return str(out)


def peft_reference(model_dir: str, adapter: str | None, prompts, max_tokens: int):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    return [hf_greedy(model, p, max_tokens) for p in prompts]


def prompts(n=3) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 200, (length,), generator=g).tolist() for length in (7, 19, 33)[:n]]


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "r8": make_adapter(tiny_model, root / "r8", 8, 1),
        "r16": make_adapter(tiny_model, root / "r16", 16, 2, rslora=True),
        "r16b": make_adapter(tiny_model, root / "r16b", 16, 3),
    }


def test_each_adapter_alone_and_all_in_one_batch_equal_peft(tiny_model, adapters):
    ps = prompts()
    want = {name: peft_reference(tiny_model, path, ps, 24) for name, path in adapters.items()}
    want[None] = peft_reference(tiny_model, None, ps, 24)
    assert want["r8"] != want[None] and want["r16"] != want["r8"]  # the adapters matter
    llm = LLM(tiny_model, dtype="float32", num_gpu_blocks_override=256, enable_lora=True,
              max_loras=3, max_lora_rank=16)  # fmt: skip
    loras = {
        name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())
    }
    for name in [None, *adapters]:  # alone
        outs = llm.generate(ps, GREEDY, lora_request=loras.get(name))
        assert [o.outputs[0].token_ids for o in outs] == want[name], name
    # one batch: every prompt under the base model and each adapter, interleaved
    names = [None, *adapters] * len(ps)
    mixed = [p for p in ps for _ in range(4)]
    outs = llm.generate(mixed, GREEDY, lora_request=[loras.get(n) for n in names])
    for i, (name, out) in enumerate(zip(names, outs)):
        assert out.outputs[0].token_ids == want[name][i // 4], (i, name)
    kv = llm.engine.kv
    kv.check_integrity()
    assert kv.num_free_blocks == llm.engine.runner.info.num_blocks


def test_adapters_never_share_prefix_cache_entries(tiny_model, adapters):
    llm = LLM(tiny_model, dtype="float32", num_gpu_blocks_override=64, block_size=4,
              max_model_len=128, enable_lora=True, max_loras=2)  # fmt: skip
    prompt = prompts()[2]
    lora = LoRARequest("r8", 1, adapters["r8"])
    first = llm.generate([prompt], GREEDY, lora_request=lora)[0].outputs[0].token_ids
    hits = llm.engine.kv.prefix_hits
    base = llm.generate([prompt], GREEDY)[0].outputs[0].token_ids  # the same prompt: no hit
    assert llm.engine.kv.prefix_hits == hits and base != first
    again = llm.generate([prompt], GREEDY, lora_request=lora)[0].outputs[0].token_ids
    assert llm.engine.kv.prefix_hits > hits and again == first  # its own entries hit


def test_more_adapters_than_slots_and_memory_stay_exact(tiny_model, adapters):
    """max_loras 1: a batch of three adapters runs them one at a time; max_cpu_loras 2:
    the third evicts the first from memory, read again when asked for."""
    ps = prompts(2)
    llm = LLM(tiny_model, dtype="float32", num_gpu_blocks_override=256, enable_lora=True,
              max_loras=1, max_cpu_loras=2)  # fmt: skip
    loras = [LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())]
    alone = {r.lora_name: [o.outputs[0].token_ids for o in llm.generate(ps, GREEDY, lora_request=r)]
             for r in loras}  # fmt: skip
    lora = llm.engine.runner.lora
    assert lora.num_evictions >= 1 and list(lora.loaded) == ["r16", "r16b"]
    outs = llm.generate(ps * 3, GREEDY, lora_request=[r for r in loras for _ in ps])
    got = [o.outputs[0].token_ids for o in outs]
    assert got == [t for r in loras for t in alone[r.lora_name]]
    assert lora.num_loads >= 1  # r8 read again


def test_bad_adapters_are_refused_with_the_reason(tiny_model, adapters, tmp_path):
    llm = LLM(tiny_model, dtype="float32", num_gpu_blocks_override=64, enable_lora=True,
              max_lora_rank=8)  # fmt: skip
    lora = llm.engine.runner.lora
    with pytest.raises(LoRAError, match="rank 16, above --max-lora-rank 8"):
        lora.add("big", adapters["r16"])
    source = Path(adapters["r8"])
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((source / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    shutil.copy(source / "adapter_model.safetensors", dora)
    with pytest.raises(LoRAError, match="use_dora"):
        lora.add("dora", str(dora))
    with pytest.raises(LoRAError, match="no adapter_config.json"):
        lora.add("none", str(tmp_path))
    with pytest.raises(ValueError, match="'missing' is not loaded"):
        llm.engine.add_request(Request("x", [5, 6], GREEDY, lora_name="missing"))
    plain = LLM(tiny_model, dtype="float32", num_gpu_blocks_override=64)
    with pytest.raises(ValueError, match="--enable-lora"):
        plain.engine.add_request(Request("x", [5, 6], GREEDY, lora_name="r8"))


def test_the_default_model_with_an_adapter_equals_peft_alone_and_in_a_mixed_batch(
    default_model, tmp_path
):
    """A random rank-8 adapter on all seven projections of the default model: PEFT's greedy
    tokens alone; and in one batch with the base model and two other adapters, each request
    as in its own run."""
    paths = {"one": make_adapter(default_model, tmp_path / "one", 8, 0, scale=1.0)}
    for seed, name in enumerate(("two", "three"), 1):  # its weights shuffled: other adapters
        paths[name] = shuffled_adapter(paths["one"], tmp_path / name, seed)
    ps = [[1, 504, 3458, 282, 4649, 314], [9690, 198, 1348, 2313, 281, 457, 28]]
    want = peft_reference(default_model, paths["one"], ps, 16)
    llm = LLM(default_model, dtype="float32", max_model_len=256, num_gpu_blocks_override=64,
              enable_lora=True, max_loras=3)  # fmt: skip
    params = SamplingParams(max_tokens=16, temperature=0.0)
    loras = {n: LoRARequest(n, i + 1, p) for i, (n, p) in enumerate(paths.items())}
    alone = {n: [o.outputs[0].token_ids for o in llm.generate(ps, params, lora_request=r)]
             for n, r in [(None, None), *loras.items()]}  # fmt: skip
    assert alone["one"] == want and alone["one"] != alone[None]
    mixed = [None, "one", "two", "three"] * len(ps)
    outs = llm.generate([p for p in ps for _ in range(4)], params,
                        lora_request=[loras.get(n) for n in mixed])  # fmt: skip
    for i, (name, out) in enumerate(zip(mixed, outs)):
        assert out.outputs[0].token_ids == alone[name][i // 4], (i, name)
