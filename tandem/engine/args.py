"""The engine's arguments in one home: its command-line flags (vLLM's names) and the
EngineConfig they make, used by `tandem serve`, each worker stage and the benchmarks."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from tandem.engine.config import (
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    SchedulerConfig,
    SchedulingPolicy,
    SpeculativeConfig,
)
from tandem.engine.pooling import detect_runner


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine's flags, with vLLM's names."""
    p.add_argument(
        "--model",
        default=None,
        help="a Hugging Face folder, a .gguf file or a Hugging Face id in the local HF cache "
        "(default: the prepared SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        type=_dtype,
        help="auto, bfloat16, float16 (half) or float32 (float); auto: bfloat16 on CUDA and on "
        "CPUs that multiply it fast (AMX, AVX-512 BF16), else float32",
    )
    p.add_argument(
        "--max-model-len", type=int, default=None, help="context length (default: the model's)"
    )
    p.add_argument("--max-num-seqs", type=int, default=256, help="requests in a batch, at most")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="the token budget of a step (prefill chunks and decodes); default 2048, 8192 for "
        "a pooling model (larger steps cost no decode latency there)",
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument(
        "--num-gpu-blocks-override",
        type=int,
        default=None,
        help="number of KV blocks, on any device",
    )
    p.add_argument(
        "--cpu-kv-cache-space",
        type=float,
        default=None,
        help="GiB of memory for the KV cache on the CPU (default 4; `tandem serve` splits that "
        "among its workers)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="fraction of the GPU's memory the worker may use (weights, activations, KV cache)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
        help="the KV cache's element type: auto (the model's dtype), fp8 (= fp8_e4m3) or "
        "fp8_e5m2: half the bytes of bf16 per token, twice the blocks in the same memory",
    )
    p.add_argument(
        "--calculate-kv-scales",
        action="store_true",
        help="with an fp8 KV cache and a checkpoint without k_scale / v_scale: measure them "
        "at start-up on a fixed text (else 1.0)",
    )
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV blocks of prompt prefixes seen before",
    )
    p.add_argument(
        "--scheduling-policy",
        default="fcfs",
        choices=["fcfs", "priority"],
        help="priority: a lower `priority` value is served first",
    )
    p.add_argument("--seed", type=int, default=0, help="of the sampler, for unseeded requests")
    p.add_argument(
        "--logprobs-mode",
        default="raw_logprobs",
        choices=["raw_logprobs", "processed_logprobs", "raw_logits", "processed_logits"],
        help="what logprobs report: the model's (raw) or what was sampled from (processed)",
    )
    p.add_argument(
        "--logits-processors",
        nargs="+",
        default=None,
        metavar="MODULE:CLASS",
        help="global logits processors applied to every batch, e.g. "
        "tandem.engine.logits_processors:NoRepeatNGramLogitsProcessor",
    )
    add_runner_args(p)
    p.add_argument(
        "--pooler-config",
        default=None,
        help='a pooling model\'s pooling, JSON over what its folder says: {"pooling_type": '
        '"LAST" | "MEAN" | "CLS" | "ALL", "normalize": bool, "softmax": bool}',
    )
    p.add_argument(
        "--speculative-config",
        default=None,
        help='speculative decoding, as vLLM\'s JSON: {"method": "ngram", '
        '"num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}, '
        '{"method": "suffix"} or a draft model {"model": PATH, "num_speculative_tokens": 4}; '
        "decode steps verify the proposals in one forward pass (greedy output unchanged)",
    )
    add_lora_args(p)
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="on CUDA, run decode steps eagerly instead of replaying CUDA graphs",
    )
    p.add_argument(
        "--cuda-graph-sizes",
        type=int,
        nargs="+",
        default=None,
        help="decode batch sizes captured as CUDA graphs at start-up (default 1, 2, 4 and "
        "multiples of 8 up to 512, at most --max-num-seqs)",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: all cores)",
    )


def default_max_num_batched_tokens(model: str | None, runner: str, convert: str) -> int:
    """2048, or 8192 for a pooling model (its steps are all prefill)."""
    config_file = Path(model or "") / "config.json"
    if model and config_file.is_file():
        config = json.loads(config_file.read_text())
        if detect_runner(model, config, runner, convert) == "pooling":
            return 8192
    return 2048


def add_runner_args(p: argparse.ArgumentParser) -> None:
    """What kind of model is served (the gateway needs it too: its endpoints differ)."""
    p.add_argument(
        "--runner",
        default="auto",
        choices=["auto", "generate", "pooling"],
        help="generate (completions, chat) or pooling (embeddings, scores, classification); "
        "auto: pooling for an encoder (BERT) or a sentence-transformers folder",
    )
    p.add_argument(
        "--convert",
        default="auto",
        choices=["auto", "none", "embed"],
        help="embed: serve a generative model as an embedder (last-token pooling, normalized)",
    )


def add_lora_args(p: argparse.ArgumentParser) -> None:
    """vLLM's LoRA flags (the engine's, and the gateway's: it lists and checks adapters)."""
    p.add_argument(
        "--enable-lora",
        action="store_true",
        help="serve LoRA adapters (PEFT folders) over the model; a request names one as its model",
    )
    p.add_argument(
        "--lora-modules",
        nargs="+",
        type=lora_module,
        default=None,
        metavar="NAME=PATH",
        help='adapters served from the start: name=path, or vLLM\'s JSON {"name": ..., '
        '"path": ..., "base_model_name": ...}',
    )
    p.add_argument("--max-loras", type=int, default=1, help="distinct adapters in one batch")
    p.add_argument("--max-lora-rank", type=int, default=16, help="the largest rank served")
    p.add_argument(
        "--max-cpu-loras",
        type=int,
        default=None,
        help="adapters kept in memory, the least recently used evicted (default: --max-loras)",
    )
    p.add_argument(
        "--allow-runtime-lora-updating",
        action="store_true",
        default=os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true"),
        help="POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING, which sets it too)",
    )


def lora_module(text: str) -> tuple[str, str]:
    """One --lora-modules entry: name=path, or {"name", "path", "base_model_name"}."""
    if text.lstrip().startswith("{"):
        try:
            entry = json.loads(text)
            return str(entry["name"]), str(entry["path"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected name=path or JSON with name and path ({e})"
            ) from None
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected name=path")
    return name, path


def lora_config(args: argparse.Namespace) -> LoRAConfig | None:
    if not getattr(args, "enable_lora", False):
        return None
    return LoRAConfig(args.max_loras, args.max_lora_rank, args.max_cpu_loras,
                      tuple(args.lora_modules or ()))  # fmt: skip


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(
            args.model,
            args.dtype,
            args.max_model_len,
            args.seed,
            args.logprobs_mode,
            tuple(args.logits_processors or ()),
            args.enforce_eager,
            tuple(args.cuda_graph_sizes or ()),
            args.runner,
            args.convert,
            args.pooler_config,
        ),
        cache=CacheConfig(
            args.block_size,
            args.num_gpu_blocks_override,
            args.gpu_memory_utilization,
            **(
                {"cpu_kv_cache_space_gib": args.cpu_kv_cache_space}
                if args.cpu_kv_cache_space
                else {}
            ),
            enable_prefix_caching=args.enable_prefix_caching,
            cache_dtype=args.kv_cache_dtype,
            calculate_kv_scales=args.calculate_kv_scales,
        ),
        scheduler=SchedulerConfig(
            args.max_num_seqs,
            args.max_num_batched_tokens
            or default_max_num_batched_tokens(args.model, args.runner, args.convert),
            SchedulingPolicy(args.scheduling_policy),
        ),
        speculative=speculative_config(getattr(args, "speculative_config", None)),
        lora=lora_config(args),
    )


def speculative_config(text: str | dict | None) -> SpeculativeConfig | None:
    """--speculative-config's JSON (or a dict, as LLM takes it); None when not given."""
    if not text:
        return None
    if isinstance(text, str):
        try:
            text = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--speculative-config must be JSON: {e}") from None
    if not isinstance(text, dict):
        raise ValueError("--speculative-config takes a JSON object")
    return SpeculativeConfig.from_dict(text)


def _dtype(text: str) -> str:
    """vLLM's dtype names: half and float stand for float16 and float32."""
    name = {"half": "float16", "float": "float32"}.get(text, text)
    if name not in ("auto", "bfloat16", "float16", "float32"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected auto, bfloat16, float16 (half) or float32 (float)"
        )
    return name
