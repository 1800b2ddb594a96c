"""Where `tandem serve MODEL` finds its model: folders, .gguf files, Hugging Face ids in the
local cache; never a download."""

from __future__ import annotations

import pytest

from tandem.model_source import cached_snapshot, resolve_model, served_name


def hub_snapshot(hub, model_id: str, revision: str = "abc123"):
    repo = hub / ("models--" + model_id.replace("/", "--"))
    folder = repo / "snapshots" / revision
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return folder


def test_a_hub_id_resolves_to_its_snapshot_in_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    folder = hub_snapshot(tmp_path, "org/tiny-model")
    hub_snapshot(tmp_path, "org/other", revision="old")  # another model's snapshot
    assert resolve_model("org/tiny-model") == str(folder)
    assert cached_snapshot("org/missing") is None
    assert served_name("org/tiny-model") == "org/tiny-model"  # served as vLLM serves it
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path.parent))
    assert cached_snapshot("org/tiny-model") is None  # $HF_HOME/hub is another folder


def test_what_cannot_be_found_says_so_and_downloads_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="never downloads models: run `hf download org/x`"):
        resolve_model("org/x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no such file"):
        resolve_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="neither a model folder nor a .gguf file"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_folders_are_served_by_their_name(tmp_path):
    folder = tmp_path / "My-Model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert resolve_model(str(folder) + "/") == str(folder)
    assert served_name(str(folder) + "/") == "My-Model"
    assert served_name(str(tmp_path / "m.Q4_0.gguf")) == "m.Q4_0"
    assert served_name(None) == "SmolLM2-135M-Instruct"
