"""Engine configuration: frozen, validated at construction."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass


class SchedulingPolicy(enum.Enum):
    FCFS = "fcfs"
    PRIORITY = "priority"


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Which model to load and how: a Hugging Face folder, a dtype, a context length."""

    model: str
    dtype: str = "auto"  # auto | bfloat16 | float32
    max_model_len: int | None = None  # None: the model's own max_position_embeddings
    seed: int = 0
    logprobs_mode: str = "raw_logprobs"  # see sampler.LogprobsMode
    logits_processors: tuple[str, ...] = ()  # "module:Class" each (logits_processors.py)
    enforce_eager: bool = False  # CUDA: no graphs for decode steps (cuda_graphs.py)
    cuda_graph_sizes: tuple[int, ...] = ()  # decode batch sizes captured (empty: vLLM's)
    runner: str = "auto"  # generate | pooling (auto: from the model folder; pooling.py)
    convert: str = "auto"  # embed: a generative model run as an embedder
    pooler_config: str | None = None  # JSON over the folder's pooling (vLLM's --pooler-config)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "bfloat16", "float32", "float16"):
            raise ValueError(
                f"dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}"
            )
        modes = ("raw_logprobs", "processed_logprobs", "raw_logits", "processed_logits")
        if self.logprobs_mode not in modes:
            raise ValueError(f"logprobs_mode must be one of {', '.join(modes)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if any(size < 1 for size in self.cuda_graph_sizes):
            raise ValueError("cuda_graph_sizes must be >= 1")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Paged KV cache: block size, how many blocks (None: sized from memory), prefix caching."""

    block_size: int = 16
    num_gpu_blocks_override: int | None = None
    gpu_memory_utilization: float = 0.9  # fraction of device memory (CUDA) the cache may use
    cpu_kv_cache_space_gib: float = 4.0  # KV cache size on the CPU
    enable_prefix_caching: bool = True
    cache_dtype: str = "auto"  # --kv-cache-dtype: auto (the model's), fp8 (e4m3), fp8_e5m2
    calculate_kv_scales: bool = False  # fp8: measure K and V scales at start-up

    def __post_init__(self) -> None:
        if self.cache_dtype not in ("auto", "fp8", "fp8_e4m3", "fp8_e5m2"):
            raise ValueError(
                f"kv_cache_dtype must be auto, fp8, fp8_e4m3 or fp8_e5m2, got {self.cache_dtype!r}"
            )
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(
                f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.cpu_kv_cache_space_gib <= 0:
            raise ValueError("cpu_kv_cache_space_gib must be > 0")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """The unified token-budget scheduler's limits."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    policy: SchedulingPolicy = SchedulingPolicy.FCFS
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if not isinstance(self.policy, SchedulingPolicy):
            raise ValueError(f"policy must be a SchedulingPolicy, got {self.policy!r}")


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """vLLM's --speculative-config: proposals verified in one forward pass of the model."""

    # "ngram": prompt lookup over the request's own tokens (spec_decode/ngram.py); "suffix":
    # suffix decoding over them and earlier responses (suffix.py); "draft_model": a smaller
    # model with the same tokenizer (draft.py), vLLM's method when only "model" is given
    method: str = "ngram"
    num_speculative_tokens: int | None = None  # suffix: its tree depth; ngram: 1
    model: str | None = None  # the draft model's folder
    prompt_lookup_min: int | None = None  # n-gram sizes tried, longest first (vLLM: 5, 5)
    prompt_lookup_max: int | None = None
    # suffix decoding (vLLM's names and defaults): match and proposal together at most this
    # deep; responses of this many finished requests searched too (0: none); proposals at
    # most factor x the match's length; and only while their estimated probability is >= min
    suffix_decoding_max_tree_depth: int = 24
    suffix_decoding_max_cached_requests: int = 10000
    suffix_decoding_max_spec_factor: float = 1.0
    suffix_decoding_min_token_prob: float = 0.1
    # no proposals while more requests than this run (vLLM's speculative_disable_by_batch_size)
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        methods = ("ngram", "suffix", "draft_model")
        if self.method not in methods:
            raise ValueError(f"speculative method {self.method!r} is not supported; use one of "
                             f"{', '.join(methods)} (or give a draft \"model\")")  # fmt: skip
        if (self.method == "draft_model") != (self.model is not None):
            raise ValueError('a draft "model" goes with the method "draft_model" only')
        k = self.num_speculative_tokens
        if k is None:
            if self.method == "draft_model":
                raise ValueError("a draft model needs num_speculative_tokens")
            k = self.suffix_decoding_max_tree_depth if self.method == "suffix" else 1
            object.__setattr__(self, "num_speculative_tokens", k)
        if k < 1:
            raise ValueError("num_speculative_tokens must be >= 1")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        lo, hi = (5, 5) if lo is None and hi is None else (lo or hi, hi or lo)
        if not 1 <= lo <= hi:
            raise ValueError("prompt_lookup_min must be >= 1 and <= prompt_lookup_max")
        object.__setattr__(self, "prompt_lookup_min", lo)
        object.__setattr__(self, "prompt_lookup_max", hi)
        if self.suffix_decoding_max_tree_depth < 2:
            raise ValueError("suffix_decoding_max_tree_depth must be >= 2")
        if self.suffix_decoding_max_cached_requests < 0:
            raise ValueError("suffix_decoding_max_cached_requests must be >= 0")
        if self.suffix_decoding_max_spec_factor <= 0:
            raise ValueError("suffix_decoding_max_spec_factor must be > 0")
        if not 0.0 <= self.suffix_decoding_min_token_prob <= 1.0:
            raise ValueError("suffix_decoding_min_token_prob must be in [0, 1]")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError("disable_by_batch_size must be >= 1")

    @classmethod
    def from_dict(cls, spec: dict) -> SpeculativeConfig:
        """vLLM's JSON: {"method": "ngram", "num_speculative_tokens": k, ...}, or a draft
        model's {"model": PATH, "num_speculative_tokens": k}."""
        spec = dict(spec)
        if "speculative_disable_by_batch_size" in spec:
            spec["disable_by_batch_size"] = spec.pop("speculative_disable_by_batch_size")
        if spec.get("model") is not None and spec.get("method") in (None, "draft_model"):
            spec["method"] = "draft_model"
        if spec.get("method") in ("eagle", "eagle3", "medusa", "mlp_speculator", "mtp"):
            raise ValueError(f"speculative method {spec['method']!r} is not supported; use "
                             "ngram, suffix or a draft model")  # fmt: skip
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"unknown speculative config fields: {sorted(unknown)}")
        return cls(**spec)


@dataclass(frozen=True, slots=True)
class LoRAConfig:
    """vLLM's --enable-lora flags: adapters served over one base model."""

    max_loras: int = 1  # distinct adapters in one batch (each a slot of stacked weights)
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # adapters kept in memory, LRU (default: max_loras)
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, PEFT folder) served from start

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError("max_loras must be >= 1")
        if self.max_lora_rank < 1:
            raise ValueError("max_lora_rank must be >= 1")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras")

    @property
    def cpu_loras(self) -> int:
        return self.max_cpu_loras or self.max_loras


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything an engine needs; `max_model_len` is resolved against the model at load."""

    model: ModelConfig
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    speculative: SpeculativeConfig | None = None
    lora: LoRAConfig | None = None  # --enable-lora
