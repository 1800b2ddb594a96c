"""Turns a scheduler step into one flat forward pass and samples the next tokens."""

from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass

import torch

from tandem.engine.attention import build_attn_metadata, use_triton
from tandem.engine.config import CacheConfig, LoRAConfig, ModelConfig
from tandem.engine.cuda_graphs import DecodeGraphs, default_capture_sizes
from tandem.engine.kv_quant import as_bytes, is_fp8, kv_torch_dtype
from tandem.engine.kv_scales import layer_kv_scales
from tandem.engine.loader import load_model, read_hf_config
from tandem.engine.logits_processors import load_logits_processors
from tandem.engine.lora.layers import lora_backend
from tandem.engine.lora.manager import LoRAManager
from tandem.engine.pooling import (
    PoolerConfig,
    detect_runner,
    pool,
    sentence_transformers_max_len,
)
from tandem.engine.request import Request
from tandem.engine.sampler import (
    LogprobsMode,
    SamplingTensors,
    gather_logprobs,
    sample,
)
from tandem.engine.spec_decode.verify import verify
from tandem.engine.structured_output.manager import GrammarManager
from tandem.kernels.cpu import load_cpu_kernels

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def select_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 where the device multiplies it fast, fp32 otherwise (fp16 on old GPUs).

    On CPUs that means AMX, or AVX-512 BF16 on AMD's cores. Intel's without AMX run torch's
    bf16 GEMM at about half their fp32 speed (168 vs 316 GFLOP/s at 2048^3 on a 2-core
    Sapphire Rapids VM without AMX; AMX makes bf16 about 5x faster than fp32). An AMD EPYC
    with AVX-512 BF16 runs it at 2.2x its fp32 (one core, 2048 x 576 x 1536: 208 vs 88
    GFLOP/s), and SmolLM2's decode step of 16 requests in 55 ms against 90 in fp32.
    The choice depends on the CPU's flags only, so every worker on a machine makes the same.
    """
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_bf16_is_fast() else torch.float32


def cpu_bf16_is_fast(cpuinfo: str | None = None) -> bool:
    """AMX, or AVX-512 BF16 on an AMD CPU (see resolve_dtype). `cpuinfo`: /proc/cpuinfo's
    text (read when None)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read(1 << 16)
        except OSError:
            return False
    fields = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags, vendor = fields.get("flags", "").split(), fields.get("vendor_id", "")
    return "amx_bf16" in flags or ("avx512_bf16" in flags and vendor == "AuthenticAMD")


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # the most glibc takes on 64-bit


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the kernel.

    A forward pass makes many temporaries of MiBs (a 2,048-token prefill step: tens of them
    per layer). By default glibc maps each fresh and unmaps it when freed, so every use pays
    a page fault per 4 KiB; on a VM that cost a third of a prefill step's time (SmolLM2,
    2,048 tokens: 5.2-6.6 s -> 3.6-4.8 s). Allocations under 32 MiB now come from the heap,
    which is never trimmed: the process keeps its peak of temporaries. False where the C
    library is not glibc (nothing changed)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
            and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        )
    except (OSError, AttributeError):
        return False


def gpu_kv_budget(mem_info: tuple[int, int], reserved: int, utilization: float,
                  activations: int) -> int:  # fmt: skip
    """Bytes for the KV cache on a GPU, with vLLM's meaning of `--gpu-memory-utilization`:
    the fraction of the card's memory this worker may hold in all (weights, activations,
    cache), so two workers sharing a card at 0.45 each both fit. `mem_info`: (free, total)
    now, with the weights loaded; `reserved`: what torch holds for this process (the
    weights); `activations`: the peak a step's temporaries may take. Never more than is
    free now (another process may hold the rest)."""
    free, total = mem_info
    return int(min(total * utilization - reserved, free) - activations)


def activation_bytes(args, max_num_batched_tokens: int, max_num_seqs: int,
                     dtype: torch.dtype) -> int:  # fmt: skip
    """An upper estimate of one step's temporaries: per batched token, the residual stream,
    the fused QKV and MLP projections (gate and up, and their product) twice over for
    allocator slack; per sequence, fp32 logits three times (raw, processed, sorted)."""
    elem = torch.finfo(dtype).bits // 8
    qkv = (args.num_heads + 2 * args.num_kv_heads) * args.head_dim
    per_token = (4 * args.hidden_size + qkv + 3 * args.intermediate_size) * elem
    return 2 * max_num_batched_tokens * per_token + 3 * max_num_seqs * args.vocab_size * 4


@dataclass(frozen=True, slots=True)
class RunnerInfo:
    """Values fixed at start-up from the model and the device."""

    device: torch.device
    dtype: torch.dtype
    num_blocks: int
    max_model_len: int
    vocab_size: int
    block_bytes: int
    kv_cache_dtype: torch.dtype  # the model's, or a float8 (--kv-cache-dtype)


class ModelRunner:
    """Owns the model, the paged KV cache tensors and the per-request sampling generators."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 256,
                 lora_config: LoRAConfig | None = None) -> None:  # fmt: skip
        self.device = select_device()
        self.dtype = resolve_dtype(model_config.dtype, self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
            load_cpu_kernels()  # built here on first use, not inside a step
        self.block_size = cache_config.block_size
        torch.manual_seed(model_config.seed)
        hf_config = read_hf_config(model_config.model)
        self.model = load_model(model_config.model, self.dtype, self.device)
        a = self.model.args
        max_model_len = (
            model_config.max_model_len
            or sentence_transformers_max_len(model_config.model)
            or a.max_position_embeddings
        )
        if max_model_len > a.max_position_embeddings:
            raise ValueError(
                f"max_model_len {max_model_len} exceeds the model's "
                f"max_position_embeddings {a.max_position_embeddings}"
            )
        kind = detect_runner(model_config.model, hf_config, model_config.runner,
                             model_config.convert)  # fmt: skip
        self.is_encoder = bool(getattr(self.model, "is_encoder", False))
        self.is_classifier = hasattr(self.model, "classify")
        self.pooler: PoolerConfig | None = None
        if kind == "pooling":
            self.pooler = PoolerConfig.of_model(model_config.model, hf_config,
                                                model_config.pooler_config)  # fmt: skip
        # An encoder keeps no KV: its cache tensors are empty, its blocks only bookkeeping.
        kv_dtype = kv_torch_dtype(cache_config.cache_dtype, self.dtype)
        elem = torch.finfo(kv_dtype).bits // 8
        kv_heads, head_dim = (0, 0) if self.is_encoder else (a.num_kv_heads, a.head_dim)
        block_bytes = 2 * a.num_layers * self.block_size * kv_heads * head_dim * elem
        if self.is_encoder:  # enough to hold every request a step can take
            num_blocks = cache_config.num_gpu_blocks_override or (
                -(-max_num_batched_tokens // self.block_size) + max_num_seqs
            )
        else:
            num_blocks = cache_config.num_gpu_blocks_override or self._blocks_for_memory(
                cache_config, block_bytes, max_num_batched_tokens, max_num_seqs
            )
        self.info = RunnerInfo(
            self.device, self.dtype, num_blocks, max_model_len, a.vocab_size, block_bytes,
            kv_dtype,
        )  # fmt: skip
        self.eos_token_id = _first(hf_config.get("eos_token_id"))
        shape = (num_blocks, kv_heads, self.block_size, head_dim)  # see attention.py
        # Zeroed: attention masks unused slots, and masked garbage could still be NaN.
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=kv_dtype, device=self.device),
                torch.zeros(shape, dtype=kv_dtype, device=self.device),
            )
            for _ in range(a.num_layers)
        ]
        self.kv_scales = layer_kv_scales(self, model_config.model, cache_config)
        self.lora: LoRAManager | None = None
        if lora_config is not None:  # adapters over the base weights (engine/lora/)
            backend = lora_backend(self.device, use_triton(self.device))
            self.lora = LoRAManager(self.model, lora_config, self.dtype, self.device, backend)
        self.graphs: DecodeGraphs | None = None
        if (
            self.lora is None  # a batch's adapter segments change step to step
            and self.device.type == "cuda"
            and not is_fp8(kv_dtype)  # torch's path reads a float8 cache
            and not model_config.enforce_eager
            and self.pooler is None  # pooling is prefill only
            and use_triton(self.device)
        ):
            sizes = model_config.cuda_graph_sizes or default_capture_sizes(max_num_seqs)
            max_blocks = -(-max_model_len // self.block_size)
            self.graphs = DecodeGraphs(self.model, self.kv_caches, list(sizes), max_blocks,
                                       self.device)  # fmt: skip
            self.graphs.capture()
        if hasattr(self.model, "stack_rows"):  # the model is final: a CPU's decode path
            self.model.stack_rows(self.kv_caches)
        self.generators: dict[str, torch.Generator] = {}
        self.grammars = GrammarManager(model_config.model, a.vocab_size, self.eos_token_id)
        self.logprobs_mode = LogprobsMode(model_config.logprobs_mode)
        self.logits_processors = load_logits_processors(
            model_config.logits_processors, a.vocab_size, self.device
        )
        logger.info(
            "model %s on %s in %s: %d KV blocks of %d tokens in %s (%.2f GiB)",
            model_config.model,
            self.device,
            self.dtype,
            num_blocks,
            self.block_size,
            kv_dtype,
            num_blocks * block_bytes / 2**30,
        )

    def _blocks_for_memory(self, cache_config: CacheConfig, block_bytes: int,
                           max_num_batched_tokens: int, max_num_seqs: int) -> int:  # fmt: skip
        if self.device.type != "cuda":
            return max(int(cache_config.cpu_kv_cache_space_gib * 2**30 // block_bytes), 1)
        budget = gpu_kv_budget(
            torch.cuda.mem_get_info(self.device),
            torch.cuda.memory_reserved(self.device),
            cache_config.gpu_memory_utilization,
            activation_bytes(self.model.args, max_num_batched_tokens, max_num_seqs, self.dtype),
        )
        if budget < block_bytes:
            raise ValueError(
                f"no GPU memory left for the KV cache at --gpu-memory-utilization "
                f"{cache_config.gpu_memory_utilization}: raise it, or give this worker a GPU "
                "of its own"
            )
        return int(budget // block_bytes)

    @torch.inference_mode()
    def execute(
        self,
        requests: list[Request],
        num_scheduled: list[int],
        block_tables,
        forks: dict[int, list[Request]] | None = None,
        spec: dict[str, list[int]] | None = None,
    ) -> tuple[list, list, dict[str, tuple]]:
        """Run one step. Returns, per request (in the given order), the sampled token id (None
        for a prefill chunk that does not reach the end of its tokens) and its logprobs (None
        unless the request asks for them); and for the forks of requests[i] (`forks[i]`,
        sampled from requests[i]'s row), {fork id: (token id, logprobs)}. A decode with
        proposals to verify (`spec`, by request id) runs them after its last token and gets
        a list of tokens (and of logprobs): the accepted proposals and one more."""
        forks, spec = forks or {}, spec or {}
        # Decodes first, shortest context first: similar lengths share an attention call.
        order = sorted(
            range(len(requests)),
            key=lambda i: (
                num_scheduled[i] != 1,
                len(block_tables[i]) if num_scheduled[i] == 1 else 0,
            ),
        )
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens, context_lens, tables, sample_rows, sample_reqs = [], [], [], [], []
        prompt_rows: list[tuple[Request, int, int, int]] = []  # request, row, first, end
        pool_rows: list[tuple[Request, int, int]] = []  # pooling requests done: their rows
        spec_rows: list[tuple[int, int, list[int]]] = []  # request index, first row, proposals
        segments: list[tuple[int, int, str | None]] = []  # rows by LoRA adapter
        for i in order:
            req, n = requests[i], num_scheduled[i]
            start = req.num_computed_tokens
            segments.append((len(input_ids), len(input_ids) + n, req.lora_name))
            drafts = spec.get(req.request_id)
            if drafts:  # its last token, then the proposals: n = 1 + len(drafts) rows
                spec_rows.append((i, len(input_ids), drafts))
                input_ids.extend(req.all_token_ids[start : start + 1] + drafts)
                positions.extend(range(start, start + n))
                query_lens.append(n)
                context_lens.append(start + n)
                tables.append(block_tables[i])
                continue
            if req.sampling_params.prompt_logprobs is not None:
                first = max(start, len(req.prompt_logprobs))  # positions not done before
                end = min(start + n, req.num_prompt_tokens - 1)
                if first < end:
                    prompt_rows.append((req, len(input_ids) + first - start, first, end))
            input_ids.extend(req.all_token_ids[start : start + n])
            positions.extend(range(start, start + n))
            query_lens.append(n)
            context_lens.append(start + n)
            tables.append(block_tables[i])
            if start + n == req.num_tokens:
                if req.sampling_params.pooling is not None:
                    pool_rows.append((req, len(input_ids) - n, len(input_ids)))
                else:
                    sample_rows.append(len(input_ids) - 1)
                    sample_reqs.append(i)
        dev = self.device
        graphed = (
            self.graphs is not None
            and len(query_lens) == len(input_ids)  # decodes only
            and self.graphs.fits(len(input_ids))
        )
        if graphed:
            bs = self.block_size
            slots = [t[(c - 1) // bs] * bs + (c - 1) % bs for t, c in zip(tables, context_lens)]
            slot_tensor = torch.tensor(slots, dtype=torch.int64)
            hidden = self.graphs.run(input_ids, positions, context_lens, tables, slot_tensor)
        else:
            if self.lora is not None:
                self.lora.set_batch(segments, {r.lora_name: r.lora_path for r in requests})
            triton = not is_fp8(self.info.kv_cache_dtype)  # torch's path reads float8
            meta = build_attn_metadata(
                query_lens, context_lens, tables, self.block_size, dev, allow_triton=triton
            )
            hidden = self.model(
                torch.tensor(input_ids, dtype=torch.int64, device=dev),
                torch.tensor(positions, dtype=torch.int64, device=dev),
                meta,
                self.kv_caches,
            )
        for req, row, first, end in prompt_rows:
            self._prompt_logprobs(req, hidden[row : row + end - first], first)
        for req, first, end in pool_rows:
            req.pooled = pool(self.model, self.pooler, req.sampling_params.pooling,
                              hidden[first:end], self.is_classifier)  # fmt: skip
        results: list = [None] * len(requests)
        logprobs: list = [None] * len(requests)
        forked: dict[str, tuple] = {}
        if spec_rows:
            rows = [r for _, first, d in spec_rows for r in range(first, first + len(d) + 1)]
            logits = self.model.compute_logits(hidden[torch.tensor(rows, device=dev)])
            verifying = [requests[i] for i, _, _ in spec_rows]
            verified = verify(logits, verifying, [d for _, _, d in spec_rows],
                              [self._generator(r) for r in verifying], self.info.vocab_size,
                              self.logits_processors, self.logprobs_mode,
                              self.grammars)  # fmt: skip
            for (i, _, _), (tokens, lps) in zip(spec_rows, verified):
                results[i], logprobs[i] = tokens, lps
        if not sample_reqs:
            return results, logprobs, forked
        sampling = [requests[i] for i in sample_reqs]
        for i, children in forks.items():  # the same hidden row again, once per fork
            sample_rows += [sample_rows[sample_reqs.index(i)]] * len(children)
            sampling += children
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=dev)])
        gens = [self._generator(r) for r in sampling]
        st = SamplingTensors.build(sampling, gens, self.info.vocab_size, dev)
        st.processors = [(p, sampling) for p in self.logits_processors]
        start = time.perf_counter()
        masked = self.grammars.bitmask(sampling)
        if masked is not None:
            st.grammar = (torch.tensor(masked[0], device=dev), masked[1])
            fill = time.perf_counter() - start
        token_ids, row_logprobs = sample(logits, st, self.logprobs_mode)
        if masked is not None:
            self.grammars.stats.mask_seconds.append(fill + st.grammar_seconds)
        for row, (req, token) in enumerate(zip(sampling, token_ids.tolist())):  # one sync
            lp = row_logprobs[row] if row_logprobs is not None else None
            if row < len(sample_reqs):
                results[sample_reqs[row]], logprobs[sample_reqs[row]] = token, lp
            else:
                forked[req.request_id] = (token, lp)
        return results, logprobs, forked

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's KV (every layer) into another: a fork's partial last block."""
        for k, v in self.kv_caches:
            k[dst].copy_(k[src])
            v[dst].copy_(v[src])

    def _prompt_logprobs(self, req: Request, hidden: torch.Tensor, first: int) -> None:
        """Logprobs of prompt tokens first+1 .. first+len(hidden), from the hidden states of
        the positions before them (raw logprobs, in slices to bound the logits' memory)."""
        k = req.sampling_params.prompt_logprobs
        targets = req.prompt_token_ids[first + 1 : first + 1 + hidden.shape[0]]
        for lo in range(0, hidden.shape[0], 256):
            logits = self.model.compute_logits(hidden[lo : lo + 256]).float()
            ids = torch.tensor(targets[lo : lo + 256], device=self.device)
            values = logits.log_softmax(dim=-1)
            req.prompt_logprobs += gather_logprobs(values, ids, [k] * len(ids))

    def _generator(self, request: Request) -> torch.Generator | None:
        seed = request.sampling_params.seed
        if seed is None:
            return None
        gen = self.generators.get(request.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            # A request that sampled elsewhere first (prefilled on another worker, or moved
            # after a preemption) skips the draws its earlier tokens took: one vocab-sized
            # row each, as in sample(). Its tokens are then the same wherever it runs.
            skip = torch.empty(self.info.vocab_size, dtype=torch.float32, device=self.device)
            for _ in range(request.num_output_tokens):
                skip.exponential_(generator=gen)
            self.generators[request.request_id] = gen
        return gen

    @property
    def kv_tile_shape(self) -> tuple[int, ...]:
        """Shape of one block's KV across the model: (layers, 2, Hkv, block_size, D)."""
        _, num_kv_heads, block_size, head_dim = self.kv_caches[0][0].shape
        return (len(self.kv_caches), 2, num_kv_heads, block_size, head_dim)

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Copy blocks out of the cache, into host memory (they leave for another process):
        (len(block_ids), layers, 2, Hkv, block_size, D). From a GPU, through pinned memory:
        one gather on the device, one DMA copy, one wait."""
        ids = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        per_layer = [
            torch.stack((as_bytes(k).index_select(0, ids), as_bytes(v).index_select(0, ids)), 1)
            for k, v in self.kv_caches
        ]  # each (n, 2, Hkv, bs, D)
        tiles = torch.stack(per_layer, 1).view(self.info.kv_cache_dtype)
        if tiles.device.type == "cpu":
            return tiles
        host = torch.empty(tiles.shape, dtype=tiles.dtype, pin_memory=True)
        host.copy_(tiles, non_blocking=True)
        torch.cuda.current_stream(tiles.device).synchronize()
        return host

    def write_blocks(self, block_ids: list[int], kv: torch.Tensor) -> None:
        """Copy (n, layers, 2, Hkv, block_size, D) tiles into the given blocks (a float8
        cache's under this runner's scales: kv_quant.requantize those stored under others)."""
        kv_dtype = self.info.kv_cache_dtype
        if (is_fp8(kv_dtype) or is_fp8(kv.dtype)) and kv.dtype != kv_dtype:
            raise ValueError(f"KV blocks in {kv.dtype} for a cache in {kv_dtype}")
        ids = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        kv = kv.to(device=self.device, dtype=kv_dtype)
        kv = as_bytes(kv)
        for layer, (k, v) in enumerate(self.kv_caches):
            as_bytes(k).index_copy_(0, ids, kv[:, layer, 0])
            as_bytes(v).index_copy_(0, ids, kv[:, layer, 1])

    def release(self, request_ids) -> None:
        """Forget per-request state of finished requests."""
        for rid in request_ids:
            self.generators.pop(rid, None)


def _first(value):
    return value[0] if isinstance(value, list) else value
