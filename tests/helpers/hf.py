"""Hugging Face transformers as the reference the engine is checked against."""

from __future__ import annotations

import torch


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Hugging Face's greedy continuation of `prompt_ids`, up to and including its EOS."""
    eos = model.generation_config.eos_token_id
    out = model.generate(
        torch.tensor([prompt_ids], device=model.device),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=model.device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=eos,
    )[0, len(prompt_ids) :].tolist()
    eos_ids = eos if isinstance(eos, list) else [eos]
    for i, t in enumerate(out):
        if t in eos_ids:
            return out[: i + 1]
    return out


def truncated_draft(model_dir: str, out) -> str:
    """The model with its first layer only: a draft that shares its tokenizer."""
    import shutil
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:1]
    model.save_pretrained(out, safe_serialization=True)
    for f in Path(model_dir).iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            shutil.copy(f, Path(out) / f.name)
    return str(out)


def make_adapter(model_dir: str, out, rank: int, seed: int, rslora: bool = False,
                 scale: float = 4.0) -> str:  # fmt: skip
    """A random PEFT adapter (B not zero, its weights times `scale`) on all seven
    projections, saved as PEFT does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tandem.engine.lora.adapter import TARGETS

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS),
                        init_lora_weights=False, use_rslora=rslora)  # fmt: skip
    model = get_peft_model(base, config)
    with torch.no_grad():  # large enough to change greedy tokens
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(scale)
    model.save_pretrained(out)
    return str(out)
