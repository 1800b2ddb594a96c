"""Llama family (SmolLM2 is one; Qwen2 is this with a qkv bias), over paged attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tandem.engine.attention import (
    AttnMetadata,
    fused_decode_applies,
    fused_decode_attention,
    paged_attention,
)
from tandem.engine.models.layers import Linear, RMSNorm, apply_rope, rope_cos_sin
from tandem.kernels.cpu import LINEAR_MAX_ROWS, RowStack, decode_layers


@dataclass(frozen=True, slots=True)
class LlamaArgs:
    """The fields of a Hugging Face config.json this family reads."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], qkv_bias: bool) -> LlamaArgs:
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        num_heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            rope_scaling=None if rope_type == "default" else dict(rope, rope_type=rope_type),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=cfg.get("attention_bias", qkv_bias),
        )


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE over the paged KV cache; q, k and v come from
    one fused projection."""

    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.q_size = a.num_heads * a.head_dim
        self.kv_size = a.num_kv_heads * a.head_dim
        self.qkv_proj = Linear(a.hidden_size, self.q_size + 2 * self.kv_size, bias=a.qkv_bias)
        self.o_proj = Linear(self.q_size, a.hidden_size, bias=False)
        self.scale = a.head_dim**-0.5
        self.k_scale = self.v_scale = 1.0  # an fp8 KV cache's (engine/kv_quant.py)
        self.kv_amax: list[float] | None = None  # set: record max |K|, max |V| (calibration)

    def forward(self, x, cos, sin, meta: AttnMetadata, k_cache, v_cache) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)  # (T, (H + 2 Hkv) * D)
        if self.kv_amax is None:  # a decode-only batch on a CPU: one call, same bits
            o = fused_decode_attention(
                qkv, cos, sin, k_cache, v_cache, meta, self.num_heads, self.scale
            )
            if o is not None:
                return self.o_proj(o)
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # q and k heads rotate together: one RoPE pass.
        qk = qk.view(T, self.num_heads + self.num_kv_heads, self.head_dim)  # (T, H + Hkv, D)
        qk = apply_rope(qk, cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)  # (T, H, D), (T, Hkv, D)
        v = v.view(T, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        if self.kv_amax is not None:
            self.kv_amax[0] = max(self.kv_amax[0], k.abs().max().item())
            self.kv_amax[1] = max(self.kv_amax[1], v.abs().max().item())
        o = paged_attention(
            q, k, v, k_cache, v_cache, meta, self.scale, self.k_scale, self.v_scale
        )  # (T, H, D)
        return self.o_proj(o.reshape(T, self.q_size))  # (T, H * D) -> (T, hidden)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate) * up), gate and up from one fused projection."""

    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        self.gate_up_proj = Linear(a.hidden_size, 2 * a.intermediate_size, bias=False)
        self.down_proj = Linear(a.intermediate_size, a.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (T, I), (T, I)
        return self.down_proj(F.silu(gate).mul_(up))


class DecoderLayer(nn.Module):
    """Pre-norm block: attention, then the MLP, each added to the residual stream."""

    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a)

    def forward(self, x, cos, sin, meta, k_cache, v_cache) -> torch.Tensor:
        """x: the residual stream, (T, hidden), updated in place and returned."""
        h = self.self_attn(self.input_layernorm(x), cos, sin, meta, k_cache, v_cache)
        h = self.mlp(self.post_attention_layernorm.add_and_norm(x, h))
        return x.add_(h)

    def row_weights(self) -> tuple[list[torch.Tensor], torch.Tensor | None] | None:
        """The layer's weights for kernels/cpu.py's `decode_layers` (norms, then the
        projections' (out, in) row forms), and the qkv bias; None where a projection is not a
        plain Linear with its row form (LoRA wraps them; CUDA has none) or has a bias other
        than qkv's."""
        attn, mlp = self.self_attn, self.mlp
        projs = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if any(type(p) is not Linear or p.weight_rows is None for p in projs):
            return None
        if any(p.bias is not None for p in projs[1:]):
            return None
        norms = [self.input_layernorm.weight, self.post_attention_layernorm.weight]
        return norms + [p.weight_rows for p in projs], attn.qkv_proj.bias


class LlamaForCausalLM(nn.Module):
    """Flat-batch forward: (T,) token ids and positions in, (T, hidden) states out."""

    is_encoder = False
    default_qkv_bias = False
    # checkpoint tensor -> (the fused parameter it fills, its shard index), for the loader
    packed_modules = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, hf_config: dict[str, Any]) -> None:
        super().__init__()
        a = self.args = LlamaArgs.from_hf(hf_config, self.default_qkv_bias)
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(a) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.lm_head = Linear(a.hidden_size, a.vocab_size, bias=False)
        if a.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.init_rope(None)
        self.row_stack: RowStack | None = None  # see stack_rows

    def stack_rows(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Gather every layer's row-form weights and caches for `decode_layers`: called by the
        model's runner once the model is final (after LoRA has wrapped its projections, which
        then keep the module path), as CUDA graphs are captured then. False, and no stack,
        where a layer has none (`DecoderLayer.row_weights`)."""
        rows = [layer.row_weights() for layer in self.layers]
        self.row_stack = None
        if any(r is None for r in rows):
            return False
        biases = [b for _, b in rows if b is not None]
        self.row_stack = RowStack(
            weights=[w for ws, _ in rows for w in ws],
            qkv_biases=biases if len(biases) == len(rows) else [],
            caches=[c for kv in kv_caches for c in kv],
        )
        return True

    def init_rope(self, device: torch.device | None) -> None:
        a = self.args
        cos, sin = rope_cos_sin(a.head_dim, a.rope_theta, a.rope_scaling, a.max_position_embeddings)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)  # (max_len, D)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)  # signed

    def checkpoint_name(self, name: str) -> str | None:
        """The parameter a checkpoint tensor fills (before fusing); None: not loaded."""
        return name.removeprefix("model.")

    def shard_sizes(self, fused: str) -> list[int]:
        a = self.args
        if fused == "qkv_proj":
            return [
                a.num_heads * a.head_dim,
                a.num_kv_heads * a.head_dim,
                a.num_kv_heads * a.head_dim,
            ]
        return [a.intermediate_size, a.intermediate_size]

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,)
        positions: torch.Tensor,  # (T,)
        meta: AttnMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (T, hidden)
        cos = self.rope_cos[positions].to(x.dtype).unsqueeze(1)  # (T, 1, D)
        sin = self.rope_sin[positions].to(x.dtype).unsqueeze(1)  # (T, 1, D), signed
        stack = self.row_stack
        if (
            stack is not None
            and x.shape[0] <= LINEAR_MAX_ROWS
            and stack.caches[0] is kv_caches[0][0]
            and fused_decode_applies(meta, x, kv_caches[0][0])
        ):  # a few decode rows on a CPU: every layer in one C++ call, the same bits
            a = self.args
            x = decode_layers(x, stack, a.rms_norm_eps, cos, sin, meta, a.num_heads,
                              self.layers[0].self_attn.scale)  # fmt: skip
            return self.norm(x)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, meta, k_cache, v_cache)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # (N, vocab)


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: Llama's shape with a bias on q, k and v."""

    default_qkv_bias = True
