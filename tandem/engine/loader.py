"""Build a model from a Hugging Face folder: config.json + *.safetensors. No pickle."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from tandem.engine.kv_quant import SCALE_NAME
from tandem.engine.models.layers import Linear, calibrate_packed
from tandem.engine.models.registry import resolve_model_class

logger = logging.getLogger(__name__)


def read_hf_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    cfg = json.loads(path.read_text())
    if cfg.get("use_sliding_window"):
        raise ValueError("sliding-window attention is not supported")
    return cfg


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Instantiate the model class for config.json and copy the safetensors weights in."""
    cfg = read_hf_config(model_dir)
    model_cls = resolve_model_class(cfg)
    with torch.device("meta"):
        model = model_cls(cfg)
    model = model.to_empty(device=device)
    if model.args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    load_weights(model, Path(model_dir))
    model = model.to(dtype).eval()
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    for module in linears:
        module.prepare()
    calibrate_packed(linears)
    model.init_rope(device)  # built on meta above; fp32, as HF does
    return model


def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Copy every checkpoint tensor into its parameter; q/k/v and gate/up into fused ones."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors in {model_dir}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if SCALE_NAME.search(name):
                    continue  # an fp8 KV cache's scales: read_kv_scales
                local = model.checkpoint_name(name)
                if local is None:
                    continue
                target, offset, size = _target(model, local)
                if target not in params:
                    if "rotary_emb" in name:
                        continue
                    raise ValueError(f"checkpoint tensor {name} has no place in the model")
                tensor = f.get_tensor(name)
                dest = params[target].data
                if size is not None:
                    dest = dest.narrow(0, offset, size)
                if dest.shape != tensor.shape:
                    raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(dest.shape)}")
                with torch.no_grad():
                    dest.copy_(tensor)
                loaded.add(target)
    tied = {"lm_head.weight"} if model.args.tie_word_embeddings else set()
    missing = set(params) - loaded - tied
    if missing:
        raise ValueError(f"weights missing from the checkpoint: {sorted(missing)[:5]}")


def read_kv_scales(model_dir: str | Path) -> dict[tuple[int, str], float]:
    """A checkpoint's KV cache scales, {(layer, "k" | "v"): scale}; empty when it has none."""
    scales = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                match = SCALE_NAME.search(name)
                if match:
                    scales[int(match[1]), match[2]] = float(f.get_tensor(name).float().max())
    return scales


def _target(model: nn.Module, name: str) -> tuple[str, int, int | None]:
    """Parameter name and row slice that checkpoint tensor `name` fills."""
    for shard, (fused, index) in model.packed_modules.items():
        if f".{shard}." in name:
            sizes = model.shard_sizes(fused)
            return name.replace(shard, fused), sum(sizes[:index]), sizes[index]
    return name, 0, None
