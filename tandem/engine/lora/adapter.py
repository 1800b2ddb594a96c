"""A LoRA adapter read from a PEFT folder: `adapter_config.json` and
`adapter_model.safetensors` (safetensors only: nothing is unpickled).

Targets may be any of the decoder's seven projections (q, k, v, o, gate, up, down); the
scaling is PEFT's, lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`, and is folded
into B here. What PEFT can express and the engine does not apply is refused with a message
naming it: other targets (embeddings, lm_head), DoRA, trained biases, modules_to_save, per-
module ranks or alphas, a rank above --max-lora-rank. `check_adapter` reads only the config
and the tensors' names and shapes (no torch: the gateway checks an adapter it is asked to
load); `read_adapter` loads the weights.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class LoRAError(ValueError):
    """An adapter that cannot be served (the message says why)."""


@dataclass(slots=True)
class LoRAAdapter:
    name: str
    path: str
    rank: int
    scaling: float
    # (layer, target) -> (A (r, in), B (out, r) x scaling), float32 torch tensors on the CPU
    weights: dict[tuple[int, str], tuple]

    @property
    def targets(self) -> set[str]:
        return {target for _, target in self.weights}


def check_adapter(
    name: str, path: str | Path, max_rank: int, num_layers: int | None = None
) -> tuple[int, float, dict[str, tuple]]:
    """(rank, scaling, {tensor name: (layer, target, "A" or "B")}) of a PEFT folder that can
    be served; raises LoRAError saying why not."""
    folder = Path(path)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise LoRAError(f"LoRA adapter {name!r}: no adapter_config.json in {folder}")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LoRAError(f"LoRA adapter {name!r}: adapter_config.json is unreadable: {e}") from None
    rank = int(config.get("r") or 0)
    if rank < 1:
        raise LoRAError(f"LoRA adapter {name!r}: its rank r is missing")
    if rank > max_rank:
        raise LoRAError(f"LoRA adapter {name!r} has rank {rank}, above --max-lora-rank "
                        f"{max_rank}")  # fmt: skip
    unsupported = [
        ("use_dora", config.get("use_dora")),
        ("modules_to_save", config.get("modules_to_save")),
        ("rank_pattern", config.get("rank_pattern")),
        ("alpha_pattern", config.get("alpha_pattern")),
        ("bias", config.get("bias", "none") != "none"),
        ("fan_in_fan_out", config.get("fan_in_fan_out")),
    ]
    named = [key for key, value in unsupported if value]
    if named:
        raise LoRAError(f"LoRA adapter {name!r} uses {', '.join(named)}, which is not supported")
    alpha = float(config.get("lora_alpha", rank))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise LoRAError(f"LoRA adapter {name!r}: no adapter_model.safetensors in {folder} "
                        "(pickled .bin adapters are not loaded)")  # fmt: skip
    from safetensors import safe_open

    keys: dict[str, tuple] = {}
    halves: dict[tuple[int, str], dict[str, list[int]]] = {}
    with safe_open(str(weights_file), framework="np") as f:
        for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            match = _KEY.search(key)
            if match is None or match[2] not in TARGETS:
                raise LoRAError(f"LoRA adapter {name!r} targets {key}, which is not "
                                f"supported (targets: {', '.join(TARGETS)})")  # fmt: skip
            layer, target, half = int(match[1]), match[2], match[3]
            if num_layers is not None and layer >= num_layers:
                raise LoRAError(f"LoRA adapter {name!r} targets layer {layer}; the model has "
                                f"{num_layers}")  # fmt: skip
            keys[key] = (layer, target, half)
            halves.setdefault((layer, target), {})[half] = list(f.get_slice(key).get_shape())
    for (layer, target), pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise LoRAError(f"LoRA adapter {name!r}: layer {layer} {target} lacks "
                            f"lora_{'B' if 'A' in pair else 'A'}")  # fmt: skip
        if pair["A"][0] != rank or pair["B"][-1] != rank:
            raise LoRAError(f"LoRA adapter {name!r}: layer {layer} {target} is not of rank "
                            f"{rank}")  # fmt: skip
    if not keys:
        raise LoRAError(f"LoRA adapter {name!r} has no weights")
    return rank, scaling, keys


def read_adapter(name: str, path: str | Path, max_rank: int, num_layers: int) -> LoRAAdapter:
    """The adapter's weights, checked (check_adapter), in float32 on the CPU."""
    from safetensors.torch import load_file

    rank, scaling, keys = check_adapter(name, path, max_rank, num_layers)
    tensors = load_file(str(Path(path) / "adapter_model.safetensors"))
    halves: dict[tuple[int, str], dict[str, object]] = {}
    for key, (layer, target, half) in keys.items():
        halves.setdefault((layer, target), {})[half] = tensors[key].float()
    weights = {where: (pair["A"].contiguous(), (pair["B"] * scaling).contiguous())
               for where, pair in halves.items()}  # fmt: skip
    return LoRAAdapter(name, str(path), rank, scaling, weights)
