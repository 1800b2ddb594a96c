"""GPU placement and memory: each worker its own card while there are enough, else shared
with its memory split; the KV cache sized with vLLM's meaning of --gpu-memory-utilization;
KV tiles leave an engine in host memory."""

from __future__ import annotations

import pytest
import torch

from tandem.cli import build_parser
from tandem.engine.model_runner import activation_bytes, gpu_kv_budget
from tandem.services.launcher import place_on_gpus, place_workers, plan_stages
from tandem.services.transport.subjects import Role

GiB = 2**30


def test_workers_get_their_own_gpus_then_share_with_the_memory_split():
    assert place_on_gpus([], 2, 0.9) == []
    assert place_on_gpus(["0", "1", "2"], 2, 0.9) == [("0", 0.9), ("1", 0.9)]
    assert place_on_gpus(["0"], 2, 0.9) == [("0", 0.45), ("0", 0.45)]
    shared = place_on_gpus(["3", "5"], 3, 0.9)
    assert shared == [("3", 0.45), ("5", 0.9), ("3", 0.45)]


@pytest.mark.parametrize(("visible", "expected"), [
    ("0,1", [("0", "0.9000"), ("1", "0.9000")]),
    ("4", [("4", "0.4500"), ("4", "0.4500")]),
    ("", [(None, None), (None, None)]),  # no GPU: nothing set
])  # fmt: skip
def test_tandem_serve_hands_each_worker_its_device(monkeypatch, visible, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    args = build_parser().parse_args(["serve", "--model", "m"])
    urls = dict.fromkeys(Role, "nats://127.0.0.1:4222")
    stages = plan_stages(args, urls, "redis://r", 50051, place_workers([0, 1], 2, "split"), [])
    workers = [s for s in stages if s.role in (Role.PREFILL, Role.DECODE)]
    got = []
    for stage in workers:
        flags = [i for i, a in enumerate(stage.argv) if a == "--gpu-memory-utilization"]
        last = stage.argv[flags[-1] + 1] if len(flags) > 1 else None
        got.append((stage.env.get("CUDA_VISIBLE_DEVICES"), last))
    assert got == expected


def test_the_kv_budget_is_the_workers_share_less_weights_and_activations():
    # an 80 GiB card, 70 free (another process holds 6), this worker's weights 4 GiB
    budget = gpu_kv_budget((70 * GiB, 80 * GiB), 4 * GiB, 0.45, 1 * GiB)
    assert budget == int(80 * GiB * 0.45 - 4 * GiB - 1 * GiB)
    # never more than is free now
    assert gpu_kv_budget((10 * GiB, 80 * GiB), 4 * GiB, 0.9, 1 * GiB) == 9 * GiB


def test_activation_estimate_grows_with_the_batch():
    from types import SimpleNamespace

    smol = SimpleNamespace(num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576,
                           intermediate_size=1536, vocab_size=49152)  # fmt: skip
    small = activation_bytes(smol, 512, 64, torch.bfloat16)
    large = activation_bytes(smol, 8192, 256, torch.bfloat16)
    assert 0 < small < large < 1 * GiB  # SmolLM2 at 8k batched tokens: well under a GiB


def test_kv_tiles_leave_the_engine_on_the_host(tiny_llama):
    from tandem.engine.config import CacheConfig, ModelConfig
    from tandem.engine.model_runner import ModelRunner

    runner = ModelRunner(ModelConfig(tiny_llama, dtype="float32", max_model_len=64),
                         CacheConfig(num_gpu_blocks_override=8))  # fmt: skip
    for k, v in runner.kv_caches:
        k[2].fill_(1.0)
        v[2].fill_(2.0)
    tiles = runner.read_blocks([2, 5])
    assert tiles.device.type == "cpu" and tiles.shape[:3] == (2, len(runner.kv_caches), 2)
    assert bool((tiles[0, :, 0] == 1).all() and (tiles[0, :, 1] == 2).all())
    assert not tiles[1].any()
