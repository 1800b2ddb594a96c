"""Pooling models, with vLLM's names: a request that wants its prompt's hidden states pooled
into a vector (an embedding, a classifier's scores) instead of generated tokens.

A pooling request is prefill only. Its prompt is computed as any other, and on the step that
completes it the runner pools the rows it needs (`pool`), the request ends, and its blocks go
back (for LAST pooling kept as prefix cache: the last token is always recomputed). LAST
needs only the last row, so such prompts may be chunked and hit the prefix cache. MEAN, CLS
and ALL need every row of the prompt in one step, and an encoder (BERT) attends both ways,
so those prompts run whole, never from the cache (`needs_whole_prompt`).

The model's pooling comes from its folder as sentence-transformers writes it (`modules.json`,
`1_Pooling/config.json`, a `Normalize` module), or vLLM's defaults (a decoder run as an
embedder: LAST, normalized; a BERT encoder: CLS), overridden by `--pooler-config`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from tandem.utils import json_flag_fields

POOLING_TYPES = ("LAST", "MEAN", "CLS", "ALL")
TASKS = ("embed", "classify", "score", "encode")
ENCODER_ARCHITECTURES = ("BertModel", "BertForSequenceClassification")


@dataclass(frozen=True, slots=True)
class PoolingParams:
    """vLLM's per-request pooling parameters. `task`: embed (the pooled vector), classify and
    score (a classifier's outputs), encode (the pooler's raw output: per token for ALL);
    `dimensions`: keep the first k of an embedding (Matryoshka), then normalize; `normalize`
    and `activation` (softmax, or sigmoid for one label): None takes the model's default."""

    task: str = "embed"
    dimensions: int | None = None
    normalize: bool | None = None
    activation: bool | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}")
        if self.dimensions is not None and (
            not isinstance(self.dimensions, int) or self.dimensions < 1
        ):
            raise ValueError("dimensions must be >= 1")


@dataclass(frozen=True, slots=True)
class PoolerConfig:
    """How a pooling model pools (vLLM's `--pooler-config`)."""

    pooling_type: str = "LAST"
    normalize: bool = True
    softmax: bool = True  # classifiers: softmax (sigmoid with one label) unless asked not to

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {', '.join(POOLING_TYPES)}")

    @classmethod
    def of_model(cls, model_dir: str | Path, hf_config: dict, override: str | None = None):
        """The folder's pooling (sentence-transformers' files, else the defaults for its
        kind), with `override` (JSON, vLLM's keys) on top."""
        encoder = is_encoder(hf_config)
        config = cls(pooling_type="CLS" if encoder else "LAST", normalize=not _is_classifier(
            hf_config))  # fmt: skip
        config = _sentence_transformers(Path(model_dir), config)
        if override:
            values = json_flag_fields(override, cls, "--pooler-config")
            if "pooling_type" in values:
                values["pooling_type"] = str(values["pooling_type"]).upper()
            config = replace(config, **values)
        return config


def _sentence_transformers(folder: Path, config: PoolerConfig) -> PoolerConfig:
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return config
    modules = json.loads(modules_file.read_text())
    normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
    config = replace(config, normalize=normalize)
    for module in modules:
        if not module.get("type", "").endswith(".Pooling"):
            continue
        settings = folder / module.get("path", "") / "config.json"
        if not settings.is_file():
            continue
        mode = json.loads(settings.read_text())
        if mode.get("pooling_mode_cls_token"):
            config = replace(config, pooling_type="CLS")
        elif mode.get("pooling_mode_lasttoken"):
            config = replace(config, pooling_type="LAST")
        elif mode.get("pooling_mode_mean_tokens"):
            config = replace(config, pooling_type="MEAN")
        else:
            raise ValueError(f"{settings}: only CLS, last-token and mean pooling are supported")
    return config


def sentence_transformers_max_len(folder: str | Path) -> int | None:
    """The folder's `max_seq_length` (sentence_bert_config.json): what sentence-transformers
    truncates to, so the context served."""
    settings = Path(folder) / "sentence_bert_config.json"
    if not settings.is_file():
        return None
    value = json.loads(settings.read_text()).get("max_seq_length")
    return value if isinstance(value, int) and value > 0 else None


def is_encoder(hf_config: dict) -> bool:
    return any(a in ENCODER_ARCHITECTURES for a in hf_config.get("architectures") or ())


def _is_classifier(hf_config: dict) -> bool:
    return any(a.endswith("ForSequenceClassification")
               for a in hf_config.get("architectures") or ())  # fmt: skip


def detect_runner(model_dir: str | Path, hf_config: dict, runner: str = "auto",
                  convert: str = "auto") -> str:  # fmt: skip
    """vLLM's `--runner` / `--convert`: generate or pooling. `auto`: pooling for an encoder or
    a sentence-transformers folder (or `--convert embed`), generate otherwise."""
    if runner not in ("auto", "generate", "pooling"):
        raise ValueError("--runner must be auto, generate or pooling")
    if convert not in ("auto", "none", "embed"):
        raise ValueError("--convert must be auto, none or embed")
    if runner != "auto":
        chosen = runner
    elif convert == "embed" or is_encoder(hf_config):
        chosen = "pooling"
    else:
        chosen = "pooling" if (Path(model_dir) / "modules.json").is_file() else "generate"
    if chosen == "generate" and is_encoder(hf_config):
        raise ValueError(f"{hf_config.get('architectures')} is an encoder: it cannot generate")
    return chosen


def needs_whole_prompt(config: PoolerConfig, encoder: bool) -> bool:
    """Whether a pooling request's prompt must run in one step, none of it from the cache."""
    return encoder or config.pooling_type != "LAST"


def pool(model, config: PoolerConfig, params: PoolingParams, rows, classifier: bool):
    """One request's output from its hidden rows (all of its prompt's, or the last one for
    LAST pooling), as float32 on the CPU: (dim,) or (tokens, dim) for ALL. (torch only here:
    the gateway reads this module's parameters without loading torch.)"""
    import torch

    rows = rows.float()
    kind = config.pooling_type
    if classifier:
        first = rows[:1] if kind in ("CLS", "ALL") else rows[-1:] if kind == "LAST" else rows
        pooled = first if kind != "MEAN" else rows.mean(0, keepdim=True)
        logits = model.classify(pooled.to(next(model.parameters()).dtype)).float()[0]
        activation = config.softmax if params.activation is None else params.activation
        if activation and params.task != "encode":
            logits = logits.sigmoid() if logits.numel() == 1 else logits.softmax(-1)
        return logits.cpu()
    if kind == "ALL":
        out = rows
    elif kind == "CLS":
        out = rows[0]
    elif kind == "MEAN":
        out = rows.mean(0)
    else:
        out = rows[-1]
    if params.dimensions is not None:
        if params.dimensions > out.shape[-1]:
            raise ValueError(f"dimensions must be <= {out.shape[-1]}")
        out = out[..., : params.dimensions]
    normalize = config.normalize if params.normalize is None else params.normalize
    if normalize and params.task != "encode":
        out = torch.nn.functional.normalize(out, dim=-1)
    return out.cpu()
