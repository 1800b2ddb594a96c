"""The lora workload's own parts: the adapters it writes are PEFT's format (the engine
serves them, the gateway's check takes them), its two deployments, and the decode-step
measurement, on a tiny model."""

from __future__ import annotations

import argparse

from tandem.bench import lora_cost
from tandem.engine.lora.adapter import check_adapter


def test_written_adapters_are_served_and_the_step_is_measured(tiny_llama, tmp_path):
    paths = lora_cost.write_adapters(tiny_llama, tmp_path, 2, 8, seed=1)
    for path in paths:
        rank, scaling, keys = check_adapter("a", path, 16, 2)
        assert rank == 8 and scaling == 2.0 and len(keys) == 2 * 7 * 2  # layers x targets x A/B
    adapters = [(f"adapter{i}", str(p)) for i, p in enumerate(paths)]
    step = lora_cost.step_cost(tiny_llama, adapters, batch=4, rank=8, repeats=2)
    assert step["step_ms_adapters"] > 0 and step["step_ms_base"] > 0 and step["batch"] == 4


def test_deployments_serve_every_adapter_in_one_batch(tiny_llama):
    args = argparse.Namespace(model=tiny_llama, lora_count=3, lora_rank=8, seed=0)
    d = lora_cost.deployments(args)
    assert d["no-lora"] == []
    flags = d["lora"]
    assert flags[:5] == ["--enable-lora", "--max-loras", "3", "--max-lora-rank", "8"]
    assert flags[6:] == [f"{n}={p}" for n, p in args.lora_adapters] and len(flags[6:]) == 3


def test_each_round_has_its_own_prompts():
    args = argparse.Namespace(num_prompts=6, input_len=32, seed=3)
    rounds = [lora_cost.round_prompts(args, 1000, r) for r in range(3)]
    assert rounds[0] == lora_cost.round_prompts(args, 1000, 0)  # the same on both servers
    firsts = [tuple(p[:16]) for prompts in rounds for p in prompts]
    assert len(set(firsts)) == len(firsts)  # no first block shared, within or across rounds
    assert all(len(p) == 32 for prompts in rounds for p in prompts)
