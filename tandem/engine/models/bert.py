"""BERT encoders (embedding and cross-encoder models): bidirectional attention within each
sequence of the flat batch, no KV cache. Module names follow Hugging Face's, so checkpoint
tensors load by name; a sequence must come whole in one step (no chunked prefill)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tandem.engine.attention import AttnMetadata, sequence_spans
from tandem.engine.models.layers import Linear
from tandem.kernels.cpu import has_prefill_attention_bf16, prefill_attention_bf16

Spans = list[tuple[int, int]]


@dataclass(frozen=True, slots=True)
class BertArgs:
    """The fields of a Hugging Face BERT config.json this family reads."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    sep_token_id: int
    num_labels: int  # 0: no classification head
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], classification: bool) -> BertArgs:
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r} (only 'gelu')")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        num_heads = cfg["num_attention_heads"]
        sep = cfg.get("sep_token_id")  # written as null by transformers: BERT's vocab then
        num_labels = 0
        if classification:  # HF derives num_labels from id2label (2 without either)
            num_labels = cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 2
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_heads,
            head_dim=cfg["hidden_size"] // num_heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 512),
            type_vocab_size=cfg.get("type_vocab_size", 2),
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
            sep_token_id=102 if sep is None else sep,
            num_labels=num_labels,
        )


class Embeddings(nn.Module):
    """Word + token type + absolute position embeddings, then LayerNorm (HF's order)."""

    def __init__(self, a: BertArgs) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(a.vocab_size, a.hidden_size)
        self.position_embeddings = nn.Embedding(a.max_position_embeddings, a.hidden_size)
        self.token_type_embeddings = nn.Embedding(a.type_vocab_size, a.hidden_size)
        self.LayerNorm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)

    def forward(self, input_ids, positions, token_type_ids) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x.add_(self.position_embeddings(positions)))  # (T, hidden)


class SelfAttention(nn.Module):
    """Bidirectional attention inside each sequence; q, k and v from one fused projection."""

    def __init__(self, a: BertArgs) -> None:
        super().__init__()
        self.num_heads, self.head_dim = a.num_heads, a.head_dim
        self.qkv = Linear(a.hidden_size, 3 * a.num_heads * a.head_dim, bias=True)

    def forward(self, x: torch.Tensor, spans: Spans) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv(x).view(T, 3, self.num_heads, self.head_dim)  # (T, 3, H, D)
        if (
            x.dtype == torch.bfloat16
            and x.device.type == "cpu"
            and self.head_dim in (32, 64, 128)
            and has_prefill_attention_bf16()
        ):
            return self._bf16_kernel(qkv, spans)
        q, k, v = qkv.transpose(0, 2).unbind(1)  # (H, T, D) each
        out = x.new_empty(self.num_heads, T, self.head_dim)  # (H, T, D)
        for start, end in spans:  # never across sequences; 4-D: torch's fused CPU kernel
            out[:, start:end] = F.scaled_dot_product_attention(
                q[None, :, start:end], k[None, :, start:end], v[None, :, start:end]
            )[0]
        return out.transpose(0, 1).reshape(T, self.num_heads * self.head_dim)  # (T, H * D)

    def _bf16_kernel(self, qkv: torch.Tensor, spans: Spans) -> torch.Tensor:
        """The CPU's bf16 attention kernel (kernels/cpu.py), every key visible: it multiplies
        with the bf16 dot-product instructions, where torch's fused kernel runs bf16 at its
        fp32 speed (all-MiniLM-L6-v2, 512 sentences: 77 -> 80.5 texts/s)."""
        T = qkv.shape[0]
        q, k, v = qkv.unbind(1)  # (T, H, D) each
        k, v = k.transpose(0, 1), v.transpose(0, 1)  # (H, T, D)
        out = qkv.new_empty(T, self.num_heads, self.head_dim)
        scale = self.head_dim**-0.5
        for start, end in spans:
            out[start:end] = prefill_attention_bf16(
                q[start:end].contiguous(), k[:, start:end].contiguous(),
                v[:, start:end].contiguous(), scale, causal=False,
            )  # fmt: skip
        return out.view(T, self.num_heads * self.head_dim)


class AddNorm(nn.Module):
    """Post-LN residual: LayerNorm(dense(h) + residual)."""

    def __init__(self, in_features: int, a: BertArgs) -> None:
        super().__init__()
        self.dense = Linear(in_features, a.hidden_size, bias=True)
        self.LayerNorm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h).add_(residual))


class Attention(nn.Module):
    def __init__(self, a: BertArgs) -> None:
        super().__init__()
        self.self = SelfAttention(a)  # HF's name: checkpoints say attention.self.query
        self.output = AddNorm(a.hidden_size, a)

    def forward(self, x: torch.Tensor, spans: Spans) -> torch.Tensor:
        return self.output(self.self(x, spans), x)


class Intermediate(nn.Module):
    def __init__(self, a: BertArgs) -> None:
        super().__init__()
        self.dense = Linear(a.hidden_size, a.intermediate_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf), HF's "gelu"


class EncoderLayer(nn.Module):
    """Attention then the MLP, each followed by its residual add and LayerNorm."""

    def __init__(self, a: BertArgs) -> None:
        super().__init__()
        self.attention = Attention(a)
        self.intermediate = Intermediate(a)
        self.output = AddNorm(a.intermediate_size, a)

    def forward(self, x: torch.Tensor, spans: Spans) -> torch.Tensor:
        h = self.attention(x, spans)
        return self.output(self.intermediate(h), h)


class Encoder(nn.Module):
    def __init__(self, a: BertArgs) -> None:
        super().__init__()
        self.layer = nn.ModuleList(EncoderLayer(a) for _ in range(a.num_layers))

    def forward(self, x: torch.Tensor, spans: Spans) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, spans)
        return x


class Pooler(nn.Module):
    def __init__(self, a: BertArgs) -> None:
        super().__init__()
        self.dense = Linear(a.hidden_size, a.hidden_size, bias=True)

    def forward(self, cls_rows: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(cls_rows))


class BertModel(nn.Module):
    """Flat-batch encoder: (T,) token ids and positions in, (T, hidden) final hidden states
    out (HF's last_hidden_state). The pooler is not loaded: embedding models pool the
    hidden states themselves."""

    is_encoder = True
    classification = False
    # checkpoint tensor -> (the fused parameter it fills, its shard index), for the loader
    packed_modules = {"query": ("qkv", 0), "key": ("qkv", 1), "value": ("qkv", 2)}

    def __init__(self, hf_config: dict[str, Any]) -> None:
        super().__init__()
        a = self.args = BertArgs.from_hf(hf_config, self.classification)
        self.embeddings = Embeddings(a)
        self.encoder = Encoder(a)

    def init_rope(self, device: torch.device | None) -> None:
        """Absolute position embeddings: nothing to build."""

    def shard_sizes(self, fused: str) -> list[int]:
        return [self.args.num_heads * self.args.head_dim] * 3

    def checkpoint_name(self, name: str) -> str | None:
        """The parameter a checkpoint tensor fills (before fusing); None: not loaded.
        Checkpoints name the encoder with or without a "bert." prefix."""
        name = name.removeprefix("bert.")
        if name == "embeddings.position_ids":  # an old buffer: positions come per token
            return None
        if name.startswith("pooler.") and not self.classification:
            return None
        return name

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,)
        positions: torch.Tensor,  # (T,)
        meta: AttnMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # unused: nothing is cached
    ) -> torch.Tensor:
        spans = sequence_spans(meta)
        x = self.embeddings(input_ids, positions, self.token_type_ids(input_ids, spans))
        return self.encoder(x, spans)  # (T, hidden)

    def token_type_ids(self, input_ids: torch.Tensor, spans: Spans) -> torch.Tensor:
        """0 up to and including each sequence's first SEP, 1 after it: the segments a
        tokenizer marks in a (query, document) pair."""
        if self.args.type_vocab_size < 2:
            return torch.zeros_like(input_ids)
        is_sep = (input_ids == self.args.sep_token_id).long()
        seps_before = is_sep.cumsum(0) - is_sep  # (T,) SEPs in the batch before each row
        starts = torch.tensor([start for start, _ in spans], dtype=torch.long)
        lens = torch.tensor([end - start for start, end in spans], dtype=torch.long)
        first_row = starts.repeat_interleave(lens).to(input_ids.device)  # (T,) its sequence's
        return (seps_before - seps_before[first_row] > 0).long()


class BertForSequenceClassification(BertModel):
    """A BERT cross-encoder (or classifier): `classify` maps each sequence's CLS row to
    `num_labels` logits through HF's pooler (dense + tanh) and classifier."""

    classification = True

    def __init__(self, hf_config: dict[str, Any]) -> None:
        super().__init__(hf_config)
        a = self.args
        self.pooler = Pooler(a)
        self.classifier = Linear(a.hidden_size, a.num_labels, bias=True)

    def classify(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """hidden_rows: (N, hidden), each sequence's CLS row -> (N, num_labels) fp32 logits."""
        return self.classifier(self.pooler(hidden_rows)).float()
