"""C++ kernels for the CPU path, built once per machine through torch's extension builder.

Torch has no paged attention on CPUs: its path gathers each request's blocks into one
buffer and reads them again in two matmuls. `paged_decode_attention` reads the cache in
place. `prefill_attention_bf16` multiplies bf16 with AVX-512 BF16's dot products, where
torch's CPU flash attention runs bf16 at its fp32 speed. `rms_norm` and `add_rms_norm` do
in one pass what torch does in five kernels; `apply_token_bitmask` applies a structured
output's allowed tokens with AVX-512 store masks. `linear_rows` is a linear layer at decode's
few rows that reads the weights with every thread (torch's stays on one core there).

They are built with the machine's own vector width (`-march=native`) into the cache
directory, keyed by the source, torch's version and the CPU's flags, so a cache shared
between different machines never runs code built for another. Where no C++ compiler is
found (or TANDEM_CPU_KERNELS=0), the engine keeps torch's path: same tokens, slower.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tandem.model_prep import cache_dir

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-std=c++17"]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def build_directory() -> Path:
    key = hashlib.sha256(
        b"\0".join(
            [_SOURCE.read_bytes(), torch.__version__.encode(), " ".join(_FLAGS).encode()]
            + [_cpu_flags().encode()]
        )
    ).hexdigest()[:16]
    return cache_dir() / "kernels" / key


# Concurrent builds (workers starting together) wait on a `lock` file in the build
# directory, for ever; a build killed midway leaves it behind. A real build takes < 2 min.
STALE_LOCK_S = 600


def clear_stale_lock(directory: Path, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove a build lock older than max_age_s (left by a killed build). True if removed."""
    lock = directory / "lock"
    try:
        if time.time() - lock.stat().st_mtime <= max_age_s:
            return False
        lock.unlink()
    except FileNotFoundError:
        return False
    logger.warning("removed a stale kernel build lock %s", lock)
    return True


@functools.cache
def load_cpu_kernels() -> bool:
    """Build (first time on this machine, ~30 s) and load the kernels. False when off or
    when the build fails (logged once): callers then take torch's path."""
    if os.environ.get("TANDEM_CPU_KERNELS", "1") == "0":
        return False
    from torch.utils.cpp_extension import load

    out = build_directory()
    out.mkdir(parents=True, exist_ok=True)
    clear_stale_lock(out)
    built = is_built(out)
    if not built:
        if (out / "lock").exists():
            logger.info("CPU kernels: another process is building them in %s; waiting", out)
        else:
            logger.info("CPU kernels: compiling C++ for this machine into %s (about 30 s, "
                        "once) ...", out)  # fmt: skip
    start = time.monotonic()
    try:
        load(
            name="tandem_cpu_kernels",
            sources=[str(_SOURCE)],
            extra_cflags=_FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(out),
            is_python_module=False,
        )
    except Exception as e:  # no compiler, no headers: torch's path still works
        logger.warning("CPU kernels unavailable (%s); attention runs through torch", e)
        return False
    if built:
        logger.info("CPU kernels ready: %s", out)
    else:
        logger.info("CPU kernels built in %.1f s: %s", time.monotonic() - start, out)
    return True


def is_built(directory: Path) -> bool:
    """Whether `directory` holds a finished build (the library is its last output)."""
    return (directory / "tandem_cpu_kernels.so").is_file()


def paged_decode_attention(
    q: torch.Tensor,  # (B, H, D)
    k_cache: torch.Tensor,  # (num_blocks, Hkv, block_size, D): q's dtype, or a float8
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (B, max_blocks) int64
    context_lens: torch.Tensor,  # (B,) int64
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """One query token per request over its first `context_lens[b]` keys. (B, H, D). A float8
    cache holds K / k_scale and V / v_scale (see engine/kv_quant.py)."""
    return torch.ops.tandem_cpu.paged_decode_attention(
        q, k_cache, v_cache, block_tables, context_lens, scale * k_scale, v_scale
    )


def decode_attention_rope(
    qkv: torch.Tensor,  # (T, (H + 2 Hkv) * D), the fused projection
    cos: torch.Tensor,  # (T, 1, D) in qkv's dtype
    signed_sin: torch.Tensor,  # (T, 1, D), (-sin, sin) by halves (layers.apply_rope)
    k_cache: torch.Tensor,  # (num_blocks, Hkv, block_size, D), qkv's dtype
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # (T,) int64: each token's cache slot
    block_tables: list[torch.Tensor],  # per group of rows, in order: (B, max_blocks) int64
    context_lens: list[torch.Tensor],  # per group: (B,) int64
    num_heads: int,
    scale: float,
) -> torch.Tensor:
    """A decode-only batch's attention in one call: RoPE on q and k (HF's roundings), k and v
    into their slots, then `paged_decode_attention` per group. (T, H * D)."""
    return torch.ops.tandem_cpu.decode_attention_rope(
        qkv, cos, signed_sin, k_cache, v_cache, slots, block_tables, context_lens, num_heads,
        scale,
    )  # fmt: skip


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale,
                               k_scale: float = 1.0, v_scale: float = 1.0):  # fmt: skip
    """The same in plain torch, one request at a time, a float8 cache dequantized first."""
    _, num_kv_heads, block_size, head_dim = k_cache.shape
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        n = int(context_lens[b])
        blocks = block_tables[b, : -(-n // block_size)]
        k = k_cache[blocks].transpose(0, 1).reshape(num_kv_heads, -1, head_dim)[:, :n]
        v = v_cache[blocks].transpose(0, 1).reshape(num_kv_heads, -1, head_dim)[:, :n]
        k, v = k.float() * k_scale, v.float() * v_scale
        group = q.shape[1] // num_kv_heads
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)  # (H, n, D)
        probs = (q[b, :, None].float() @ k.transpose(1, 2) * scale).softmax(-1)
        out[b] = (probs @ v)[:, 0].to(q.dtype)
    return out


@functools.cache
def has_prefill_attention_bf16() -> bool:
    """Built where the compiler targets AVX-512 BF16 (see the kernel). Asked once per layer
    per step: answered once."""
    return load_cpu_kernels() and hasattr(torch.ops.tandem_cpu, "prefill_attention_bf16")


def prefill_attention_bf16(
    q: torch.Tensor,  # (T, H, D) bf16
    k: torch.Tensor,  # (Hkv, S, D) bf16, S >= T
    v: torch.Tensor,
    scale: float,
    causal: bool = True,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Attention of the last T of S positions over the S keys, causal (or, for an encoder,
    each over all of them), in bf16; head sizes 32, 64 and 128. (T, H, D). K and V may be
    float8 (an FP8 cache's K / k_scale, V / v_scale): widened as the kernel repacks them."""
    return torch.ops.tandem_cpu.prefill_attention_bf16(q, k, v, scale, causal, k_scale, v_scale)


def prefill_attention_ref(q, k, v, scale, causal: bool = True):
    """The same through torch's SDPA in fp32 (for tests)."""
    t, s = q.shape[0], k.shape[1]
    mask = torch.arange(s)[None, :] <= torch.arange(s - t, s)[:, None]
    if not causal:
        mask = torch.ones(t, s, dtype=torch.bool)
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1)[None], k.float()[None], v.float()[None],
        attn_mask=mask, scale=scale, enable_gqa=True,
    )  # fmt: skip
    return out[0].transpose(0, 1).to(q.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)) over the last dim, in fp32, as Hugging Face."""
    return torch.ops.tandem_cpu.rms_norm(x, weight, eps)


def add_rms_norm(
    residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """residual += x (in place), then rms_norm(residual)."""
    return torch.ops.tandem_cpu.add_rms_norm(residual, x, weight, eps)


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: -inf at each listed row's tokens whose bit in its bitmask row is clear
    ((N, vocab) fp32 logits, int64 rows, (len(rows), ceil(vocab / 32)) int32 bitmask)."""
    torch.ops.tandem_cpu.apply_token_bitmask(logits, rows, bitmask)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm (for tests)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def lora_shrink_expand(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                       lora_bt: torch.Tensor, row_slots: torch.Tensor,
                       shard_sizes: list[int]) -> None:  # fmt: skip
    """In place: y[i] += Bt[s]^T (A[s] x[i]) for each row i of slot s = row_slots[i] >= 0, x
    (rows, in), y (rows, out), A (slots, R, in), Bt (slots, R, out) with R = shards x rank and
    rank block k nonzero only in shard k's columns (`shard_sizes` split out). In fp32."""
    torch.ops.tandem_cpu.lora_shrink_expand(y, x, lora_a, lora_bt, row_slots, shard_sizes)


LINEAR_MAX_ROWS = 4  # the most rows linear_rows takes (kMaxLinearRows)


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ bias) for x of 1 to LINEAR_MAX_ROWS rows, W (out, in) contiguous: W's rows
    split over torch's threads, fp32 accumulation, the result in x's dtype."""
    return torch.ops.tandem_cpu.linear_rows(x, weight, bias)


@dataclass(frozen=True, slots=True)
class RowStack:
    """A model's decoder layers for `decode_layers`: per layer its input and post-attention
    RMSNorm weights, then its qkv, o, gate_up and down weights, (out, in); the qkv biases
    (one a layer, or none); per layer its k and v caches."""

    weights: list[torch.Tensor]
    qkv_biases: list[torch.Tensor]
    caches: list[torch.Tensor]


def decode_layers(
    x: torch.Tensor,  # (T, hidden) residual stream, updated in place
    stack: RowStack,
    eps: float,
    cos: torch.Tensor,  # (T, 1, D) in x's dtype
    signed_sin: torch.Tensor,
    meta,  # engine/attention.py's AttnMetadata of a decode-only batch
    num_heads: int,
    scale: float,
) -> torch.Tensor:
    """Every Llama-family decoder layer over 1 to LINEAR_MAX_ROWS decode rows in one call.
    Each layer is what the module's forward runs, the same kernels in the same order (so the
    same bits): rms_norm, qkv (+ bias), `decode_attention_rope`, o, add_rms_norm, gate_up,
    SiLU x up, down, the residual add."""
    groups = meta.decode_groups
    return torch.ops.tandem_cpu.decode_layers(
        x, stack.weights, stack.qkv_biases, stack.caches, eps, cos, signed_sin,
        meta.slot_mapping, [g.block_tables for g in groups], [g.context_lens for g in groups],
        num_heads, scale,
    )  # fmt: skip
