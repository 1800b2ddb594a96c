"""`tandem bench serve --workload lora`: what serving LoRA adapters costs.

The bench writes `--lora-count` (4) random adapters of rank `--lora-rank` (16) on all seven
projections of the model, as PEFT saves them (adapter_config.json, adapter_model.safetensors),
then starts the disaggregated cluster twice, one after the other: without LoRA, and with
`--enable-lora --max-loras <count>` serving them (all in one batch). On the first, `--rounds`
rounds of the throughput load (`--max-concurrency`, 32) on the base model; on the second,
`--rounds` alternated rounds of the same load on the base model and spread round-robin over
the adapters. `ratio` = adapters / base output tok/s (medians, same server); `base_vs_plain` =
the LoRA server's base figure / the server without LoRA's (the cost of merely enabling it).

`lora_ms_per_step`: in this process, on one thread as the decode worker runs, the model's
decode step at batch `--max-concurrency` with every row on an adapter (round-robin) against
the same step on the base model, LoRA enabled both times; the difference, and its share of
the step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from tandem.bench.load import ServerInfo, random_prompts, run_load, summarize

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--lora-count", type=int, default=4, help="adapters made and served")
    g.add_argument("--lora-rank", type=int, default=16)


def write_adapters(model: str, folder: Path, count: int, rank: int, seed: int) -> list[Path]:
    """`count` random PEFT adapters of `rank` on all seven projections of `model`."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((Path(model) / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = (config.get("num_key_value_heads") or heads) * head_dim
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv),
              "v_proj": (hidden, kv), "o_proj": (heads * head_dim, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
              "down_proj": (inter, hidden)}  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(count):
        tensors = {}
        for layer in range(config["num_hidden_layers"]):
            for target, (fan_in, fan_out) in shapes.items():
                part = "self_attn" if target in TARGETS[:4] else "mlp"
                key = f"base_model.model.model.layers.{layer}.{part}.{target}"
                tensors[f"{key}.lora_A.weight"] = (
                    torch.randn(rank, fan_in, generator=g) / fan_in**0.5
                )
                tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.01
        path = folder / f"adapter{i}"
        path.mkdir(parents=True)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": TARGETS,
            "bias": "none", "base_model_name_or_path": model,
        }))  # fmt: skip
        paths.append(path)
    return paths


def deployments(args: argparse.Namespace) -> dict[str, list[str]]:
    from tandem.model_prep import default_model_dir

    model = args.model or str(default_model_dir())
    folder = Path(tempfile.mkdtemp(prefix="tandem-bench-lora-"))
    paths = write_adapters(model, folder, args.lora_count, args.lora_rank, args.seed)
    args.lora_adapters = [(f"adapter{i}", str(p)) for i, p in enumerate(paths)]
    modules = [f"{name}={path}" for name, path in args.lora_adapters]
    return {
        "no-lora": [],
        "lora": ["--enable-lora", "--max-loras", str(args.lora_count), "--max-lora-rank",
                 str(args.lora_rank), "--lora-modules", *modules],
    }  # fmt: skip


def _load(url: str, prompts, args, models: list[str] | None, desc: str) -> dict:
    bodies = None if models is None else [{"model": m} for m in models]
    load = run_load(url, prompts, args.output_len, args.max_concurrency, args.request_rate,
                    args.seed, bodies, desc=desc)  # fmt: skip
    results, duration = asyncio.run(load)
    return summarize(results, duration)


def round_prompts(args: argparse.Namespace, vocab_size: int, round_: int) -> list[list[int]]:
    """Round `round_`'s prompts, the same on both servers. Each round has its own: the prefix
    cache would serve a repeated round's prompts (from the second round on, some of them),
    and later rounds would run faster than the first for that alone."""
    seed = args.seed + 7919 * round_
    return random_prompts(args.num_prompts + 2, args.input_len, vocab_size, seed)


def run(name: str, url: str, info: ServerInfo, args: argparse.Namespace) -> dict:
    if name == "no-lora":  # as many rounds as the other server's base
        figures = [_load(url, round_prompts(args, info.vocab_size, r), args, None, f"{name} base")
                   for r in range(args.rounds)]  # fmt: skip
        print(f"{name} base: " + " ".join(f"{f['output_tok_s']:.1f}" for f in figures)
              + " output tok/s")  # fmt: skip
        return {"base": figures}
    adapters = [a for a, _ in args.lora_adapters]
    figures: dict[str, list[dict]] = {"base": [], "adapters": []}
    for round_ in range(args.rounds):
        prompts = round_prompts(args, info.vocab_size, round_)
        for mode, models in (("base", None), ("adapters", adapters)):  # no shared cache entries
            f = _load(url, prompts, args, models, f"{name} {mode}")
            figures[mode].append(f)
            print(f"{name} round {round_ + 1} {mode:<8}: {f['output_tok_s']:.1f} output tok/s "
                  f"({f['completed']} completed, {f['failed']} failed)")  # fmt: skip
    return figures


def step_cost(model: str, adapters: list[tuple[str, str]], batch: int, rank: int,
              repeats: int = 20) -> dict:  # fmt: skip
    """The decode step at `batch` rows, each on an adapter (round-robin) and on the base
    model, one thread; milliseconds (medians)."""
    import torch

    from tandem.engine.config import CacheConfig, LoRAConfig, ModelConfig
    from tandem.engine.model_runner import ModelRunner
    from tandem.engine.request import Request, SamplingParams

    torch.set_num_threads(1)
    config = LoRAConfig(len(adapters), rank, None, tuple(adapters))
    runner = ModelRunner(ModelConfig(model), CacheConfig(num_gpu_blocks_override=batch * 8 + 8),
                         batch, batch, lora_config=config)  # fmt: skip
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    times = {}
    for mode in ("base", "adapters"):
        requests, tables = [], []
        for i in range(batch):
            r = Request(f"{mode}{i}", [5 + i] * 63, params)
            r.append_output_token(7)
            r.num_computed_tokens = 63
            if mode == "adapters":
                r.lora_name, r.lora_path = adapters[i % len(adapters)]
            requests.append(r)
            tables.append(list(range(i * 8, i * 8 + 5)))
        samples = []
        for _ in range(repeats + 2):
            start = time.perf_counter()
            runner.execute(requests, [1] * batch, tables)
            samples.append(time.perf_counter() - start)
        times[mode] = 1000 * statistics.median(samples[2:])
    return {"step_ms_base": times["base"], "step_ms_adapters": times["adapters"],
            "lora_ms_per_step": times["adapters"] - times["base"],
            "lora_share_of_step": (times["adapters"] - times["base"]) / times["adapters"],
            "batch": batch}  # fmt: skip


def report(runs: dict[str, dict], args: argparse.Namespace) -> tuple[dict, bool]:
    from tandem.model_prep import default_model_dir

    plain = statistics.median(f["output_tok_s"] for f in runs["no-lora"]["base"])
    base = statistics.median(f["output_tok_s"] for f in runs["lora"]["base"])
    adapted = statistics.median(f["output_tok_s"] for f in runs["lora"]["adapters"])
    model = args.model or str(default_model_dir())
    step = step_cost(model, args.lora_adapters, args.max_concurrency, args.lora_rank)
    ratio = adapted / base
    print(f"{'=' * 20} LoRA ({args.lora_count} adapters of rank {args.lora_rank}) {'=' * 20}")
    print(
        f"output tok/s: base {base:.1f}, adapters {adapted:.1f} (same server); base without "
        f"--enable-lora {plain:.1f}"
    )
    print(f"ratio adapters / base: {ratio:.3f}  (target >= 0.8)")
    print(f"base with / without --enable-lora: {base / plain:.3f}  (within 5%)")
    print(
        f"decode step at batch {step['batch']} (one thread, in this process): "
        f"{step['step_ms_base']:.1f} ms base, {step['step_ms_adapters']:.1f} ms on adapters: "
        f"LoRA {step['lora_ms_per_step']:.1f} ms, {step['lora_share_of_step']:.0%} of the step"
    )
    result = {
        "ratio": ratio,
        "lora_ms_per_step": step["lora_ms_per_step"],
        "lora_share_of_step": step["lora_share_of_step"],
        "base_vs_plain": base / plain,
        "output_tok_s_base": base,
        "output_tok_s_adapters": adapted,
        "output_tok_s_plain": plain,
        "step": step,
        "workload": {
            k: getattr(args, k)
            for k in (
                "num_prompts",
                "input_len",
                "output_len",
                "max_concurrency",
                "rounds",
                "lora_count",
                "lora_rank",
            )
        },  # fmt: skip
        "deployments": runs,
    }
    ok = all(f["failed"] == 0 for r in runs.values() for mode in ("base", "adapters")
             for f in r.get(mode, []))  # fmt: skip
    return result, ok
