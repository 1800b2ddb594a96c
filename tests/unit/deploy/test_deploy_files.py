"""The deployment files, checked offline: docker-compose.yml against the Compose schema
(shipped in the docker-compose 1.29 package), its references (files mounted, services named),
the NATS accounts of compose and Kubernetes against the subject table, and the Dockerfile
doing what `make` does, through the same script."""

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

from tests.helpers.paths import REPO_ROOT


def compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


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
                assert (REPO_ROOT / source).exists(), f"{name} mounts missing {source}"
        if service.get("image") == "tandem:latest":
            assert service["build"] == "." and service["command"][0] in {
                "gateway", "tokenizer", "scheduler", "prefill", "decode",
            }  # fmt: skip
    scaled = [s for s in ("prefill", "decode") if "ports" in services[s]]
    assert not scaled, "a published port would stop `--scale` from starting replicas"
    prometheus = yaml.safe_load((REPO_ROOT / "deploy/prometheus/prometheus.yml").read_text())
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
    text = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return "\n".join(line[4:] for line in text.splitlines() if line.startswith("RUN "))


def test_the_image_is_built_by_the_steps_make_runs():
    makefile = (REPO_ROOT / "Makefile").read_text()
    runs = _dockerfile_runs()
    for step in ("bash scripts/setup.sh", "tandem model prepare"):
        assert step in runs, f"the Dockerfile does not run {step!r}"
        assert step in makefile, f"make does not run {step!r}"
    # What setup.sh installs from is inside the image: the COPY sources cover it.
    copied = set()
    for line in (REPO_ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied |= set(shlex.split(line)[1:-1])
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert {"pyproject.toml", project["readme"], "scripts", "tandem"} <= copied
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert not copied & set(ignored)


def test_the_image_picks_torch_for_its_device_and_runs_as_non_root():
    text = (REPO_ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER tandem$", text, re.M)
    assert "cpu)  export TORCH_INDEX_URL=" in text and "cuda) export TORCH_INDEX_URL=" in text
    assert (
        '${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}'
        in (REPO_ROOT / "scripts" / "setup.sh").read_text()
    )
    assert 'ENTRYPOINT ["tandem"]' in text


_CONF_TOKEN = re.compile(
    r"\s*(?:#[^\n]*|(?P<open>[{\[])|(?P<close>[}\]])|(?P<key>[A-Za-z_]\w*)\s*[:=]"
    r'|"(?P<str>(?:[^"\\]|\\.)*)"|\$(?P<var>\w+)|(?P<bool>true|false)\b)'
)


def parse_nats_conf(text: str) -> dict:
    """The subset of nats-server's config syntax that servers.nats_conf writes: maps, lists,
    quoted strings, booleans and `$VAR` references (read back as "$VAR")."""
    tokens = []
    for m in _CONF_TOKEN.finditer(text):
        kind = m.lastgroup
        if kind is not None:
            tokens.append((kind, m[kind]))
    assert "".join(_CONF_TOKEN.sub("", text).split()) == "", "unparsed config text"
    pos = 0

    def value():
        nonlocal pos
        kind, tok = tokens[pos]
        pos += 1
        if kind == "open":
            return mapping("}") if tok == "{" else items()
        if kind == "str":
            return re.sub(
                r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m[1], m[1]), tok
            )
        return {"var": f"${tok}", "bool": tok == "true"}[kind]

    def items() -> list:
        nonlocal pos
        out = []
        while tokens[pos] != ("close", "]"):
            out.append(value())
        pos += 1
        return out

    def mapping(end: str | None) -> dict:
        nonlocal pos
        out = {}
        while pos < len(tokens) and tokens[pos] != ("close", end):
            kind, key = tokens[pos]
            assert kind == "key", tokens[pos]
            pos += 1
            out[key] = value()
        pos += 1
        return out

    return mapping(None)


def nats_users(conf_text: str) -> dict[str, dict]:
    return {u["user"]: u for u in parse_nats_conf(conf_text)["authorization"]["users"]}


def k8s_nats_conf() -> str:
    docs = yaml.safe_load_all((REPO_ROOT / "deploy" / "k8s" / "nats.yaml").read_text())
    (config,) = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "nats-accounts"
    ]
    return config["data"]["tandem.conf"]


@pytest.mark.parametrize("where", ["compose", "k8s", "helm"])
def test_the_nats_accounts_allow_each_role_exactly_its_subjects(where):
    """The permission rules shipped for docker-compose, Kubernetes and the Helm chart are the
    subject table's, so they cannot go stale. To refresh them, write
    servers.deploy_accounts_conf() to deploy/nats/tandem.conf,
    deploy/helm/tandem/files/nats-accounts.conf and into the ConfigMap nats-accounts of
    deploy/k8s/nats.yaml."""
    from tandem.services.servers import deploy_accounts_conf, password_env
    from tandem.services.transport.subjects import Role, permissions

    text = {
        "compose": lambda: (REPO_ROOT / "deploy/nats/tandem.conf").read_text(),
        "k8s": k8s_nats_conf,
        "helm": lambda: (REPO_ROOT / "deploy/helm/tandem/files/nats-accounts.conf").read_text(),
    }[where]()
    users = nats_users(text)
    assert set(users) == set(Role)
    for role in Role:
        assert users[role]["permissions"] == permissions(role), role
        assert users[role]["password"] == f"${password_env(role)}"
    assert text == deploy_accounts_conf()


def test_the_config_parser_reads_what_the_renderer_writes():
    from tandem.services.servers import EnvRef, nats_conf

    value = {"a": {"s": 'q"b\\n\n', "on": True, "off": False, "env": EnvRef("PW")},
             "l": ["x", {"k": ["y"]}]}  # fmt: skip
    assert parse_nats_conf(nats_conf(value)) == value | {"a": value["a"] | {"env": "$PW"}}


def test_compose_runs_nats_with_the_accounts_and_each_stage_as_its_role():
    from tandem.services.servers import password_env
    from tandem.services.transport.subjects import Role

    services = compose()["services"]
    nats = services["nats"]
    command = nats["command"]
    conf_path = command[command.index("-c") + 1]
    mounts = dict(v.split(":")[1::-1] for v in nats["volumes"])  # container path -> source
    assert mounts[conf_path] == "./deploy/nats/tandem.conf"
    defaults = {}
    for role in Role:
        var = password_env(role)
        m = re.fullmatch(r"\$\{(\w+):-([A-Za-z][\w-]*)\}", nats["environment"][var])
        assert m and m[1] == var, var
        defaults[role] = m[2]
    for name, service in services.items():
        if service.get("image") != "tandem:latest":
            continue
        role = Role(service["command"][0])
        url = service["environment"]["NATS_URL"]
        want = f"nats://{role}:${{{password_env(role)}:-{defaults[role]}}}@nats:4222"
        assert url == want, name
