"""The deployment files, checked offline: docker-compose.yml against the Compose schema
(shipped in the docker-compose 1.29 package), its references (files mounted, services named),
and the Dockerfile doing what `make` does, through the same script."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def compose_schema() -> dict:
    # The package is installed for this file only; its code (old dependencies) never runs.
    spec = importlib.util.find_spec("compose")
    assert spec is not None, "docker-compose (for its schema) is installed by scripts/setup.sh"
    path = Path(spec.submodule_search_locations[0]) / "config" / "compose_spec.json"
    return json.loads(path.read_text())


def test_compose_file_matches_the_compose_schema():
    jsonschema.Draft201909Validator(compose_schema()).validate(compose())


def test_the_schema_check_can_fail():
    bad = compose()
    bad["services"]["decode"]["restart_policy"] = "always"  # not a service key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft201909Validator(compose_schema()).validate(bad)


def test_compose_references_are_real():
    services = compose()["services"]
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert set(depends) <= set(services), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
        if service.get("image") == "tandem:latest":
            assert service["build"] == "." and service["command"][0] in {
                "gateway", "tokenizer", "scheduler", "prefill", "decode",
            }  # fmt: skip
    scaled = [s for s in ("prefill", "decode") if "ports" in services[s]]
    assert not scaled, "a published port would stop `--scale` from starting replicas"
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (target,) = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in services and port in services[host]["expose"]


def test_every_stage_command_parses_with_the_cli():
    from tandem.cli import build_parser

    for name, service in compose()["services"].items():
        if service.get("image") == "tandem:latest":
            args = build_parser().parse_args(service["command"])
            assert args.command == name


def _dockerfile_runs() -> str:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return "\n".join(line[4:] for line in text.splitlines() if line.startswith("RUN "))


def test_the_image_is_built_by_the_steps_make_runs():
    makefile = (ROOT / "Makefile").read_text()
    runs = _dockerfile_runs()
    for step in ("bash scripts/setup.sh", "tandem model prepare"):
        assert step in runs, f"the Dockerfile does not run {step!r}"
        assert step in makefile, f"make does not run {step!r}"
    # What setup.sh installs from is inside the image: the COPY sources cover it.
    copied = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied |= set(shlex.split(line)[1:-1])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {"pyproject.toml", project["readme"], "scripts", "tandem"} <= copied
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not copied & set(ignored)


def test_the_image_picks_torch_for_its_device_and_runs_as_non_root():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER tandem$", text, re.M)
    assert "cpu)  export TORCH_INDEX_URL=" in text and "cuda) export TORCH_INDEX_URL=" in text
    assert (
        '${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}'
        in (ROOT / "scripts" / "setup.sh").read_text()
    )
    assert 'ENTRYPOINT ["tandem"]' in text
