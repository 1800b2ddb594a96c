"""Where `tandem serve MODEL` finds its model: a Hugging Face folder, a `.gguf` file
(converted once into Tandem's cache, as `tandem model prepare` converts the default one), or a
Hugging Face id already in the local Hugging Face cache. Nothing is ever downloaded."""

from __future__ import annotations

import os
from pathlib import Path


def hub_cache() -> Path:
    """The local Hugging Face hub cache, where `hf download` puts models."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home) / "hub"


def is_hub_id(spec: str) -> bool:
    """`org/name`, as the Hugging Face hub names models."""
    return spec.count("/") == 1 and all(spec.split("/"))


def cached_snapshot(model_id: str) -> Path | None:
    """The folder of `org/name` in the local hub cache (the snapshot `refs/main` names, else
    the only one), or None when it is not there."""
    if not is_hub_id(model_id):
        return None
    repo = hub_cache() / ("models--" + model_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file():
        folder = snapshots / ref.read_text().strip()
        if (folder / "config.json").is_file():
            return folder
    found = [p for p in snapshots.glob("*") if (p / "config.json").is_file()]
    return found[0] if len(found) == 1 else None


def resolve_model(spec: str | None) -> str:
    """The model folder to load for `spec` (None: the prepared default model). ValueError,
    with what to do, when there is none."""
    from tandem import model_prep

    if not spec:
        return str(model_prep.prepare_default_model())
    try:
        packaged = model_prep.packaged_model_dir(spec)
    except RuntimeError as e:
        raise ValueError(f"model {spec}: {e}") from None
    if packaged is not None:
        return str(packaged)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model {spec}: a folder without config.json")
        return str(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"model {spec}: no such file")
        if _is_packaged(path):  # the default model's own file: its prepared folder
            return str(model_prep.prepare_default_model())
        return str(model_prep.prepare_gguf(path))
    if path.exists():
        raise ValueError(f"model {spec}: neither a model folder nor a .gguf file")
    snapshot = cached_snapshot(spec)
    if snapshot is not None:
        return str(snapshot)
    raise ValueError(
        f"model {spec!r} is not a folder, a .gguf file or a Hugging Face id in the local cache "
        f"({hub_cache()}); Tandem never downloads models: run `hf download {spec}` where the "
        "hub is reachable and bring the cache or the folder here"
    )


def served_name(spec: str | None) -> str:
    """The name a model is served as by default: a hub id as given, else the folder's or
    file's name."""
    from tandem.model_prep import (
        DEFAULT_MODEL_NAME,
        PACKAGED_ALIASES,
        PACKAGED_MODELS,
        packaged_model_name,
    )

    if not spec:
        return DEFAULT_MODEL_NAME
    if spec in PACKAGED_MODELS or spec in PACKAGED_ALIASES:
        return spec  # as given, as vLLM serves a hub id
    path = Path(spec.rstrip("/"))
    if path.is_dir() and (name := packaged_model_name(path)) is not None:
        return name
    if not path.exists() and is_hub_id(spec):
        return spec  # a hub id, as vLLM serves it
    return path.stem if path.suffix == ".gguf" else path.name


def _is_packaged(gguf: Path) -> bool:
    from tandem.model_prep import find_gguf

    try:
        return gguf.resolve() == find_gguf().resolve()
    except RuntimeError:  # the default model's package is not installed
        return False
