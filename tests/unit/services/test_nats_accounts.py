"""The per-role NATS accounts: each role granted exactly its rows of the subject table, the
config rendered in nats-server's syntax (and accepted by nats-server), and the permissions
page of the docs equal to the code."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tandem.services.servers import (
    EnvRef,
    accounts_conf,
    deploy_accounts_conf,
    nats_conf,
    nats_server_binary,
    password_env,
)
from tandem.services.transport import subjects
from tandem.services.transport.subjects import SUBJECTS, Role
from tests.helpers.paths import REPO_ROOT


def nats_match(pattern: str, subj: str) -> bool:
    """NATS's own wildcards: `*` one token, `>` one or more at the end."""
    want, got = pattern.split("."), subj.split(".")
    for i, w in enumerate(want):
        if w == ">":
            return len(got) > i
        if i >= len(got) or (w != "*" and w != got[i]):
            return False
    return len(want) == len(got)


def instances(row: subjects.Subject) -> list[str]:
    """Concrete subjects of a row: its id plain and with dots (a restarted worker's)."""
    return [row.full.replace("*", worker_id) for worker_id in ("w-0", "w-0.1", "host.lan-9")]


@pytest.mark.parametrize("role", list(Role))
def test_each_role_is_granted_exactly_its_own_rows(role):
    perms = subjects.permissions(role)
    for row in SUBJECTS:
        for subj in instances(row):
            publishes = any(nats_match(p, subj) for p in perms["publish"]["allow"])
            subscribes = any(nats_match(p, subj) for p in perms["subscribe"]["allow"])
            assert publishes == (role in row.publishers), (role, subj)
            assert subscribes == (role in row.subscribers), (role, subj)


def test_requesters_hear_replies_and_answerers_may_reply():
    for role in Role:
        perms = subjects.permissions(role)
        requests = any(role in r.publishers and r.reply for r in SUBJECTS)
        answers = any(role in r.subscribers and r.reply for r in SUBJECTS)
        assert (subjects.INBOX in perms["subscribe"]["allow"]) == requests, role
        assert perms.get("allow_responses", False) == answers, role
    assert subjects.permissions(Role.DECODE)["allow_responses"] is True  # probes, KV, hand-offs
    assert subjects.INBOX in subjects.permissions(Role.PREFILL)["subscribe"]["allow"]


def test_nats_conf_renders_maps_lists_and_scalars():
    text = nats_conf(
        {"a": {"s": 'q"b\\n', "on": True, "n": 3, "env": EnvRef("PW")}, "l": ["x", {"k": []}]}
    )
    assert text == (
        "a: {\n"
        '  s: "q\\"b\\\\n"\n'
        "  on: true\n"
        "  n: 3\n"
        "  env: $PW\n"
        "}\n"
        "l: [\n"
        '  "x"\n'
        "  {\n"
        "    k: []\n"
        "  }\n"
        "]"
    )


def test_nats_conf_refuses_what_it_cannot_write():
    with pytest.raises(ValueError):
        nats_conf({"a b": 1})
    with pytest.raises(ValueError):
        nats_conf({"a": "bell\x07"})
    with pytest.raises(TypeError):
        nats_conf({"a": 1.5})
    with pytest.raises(ValueError):
        EnvRef("NOT-A-NAME")


def test_accounts_conf_gives_each_role_its_permissions():
    text = accounts_conf({Role.GATEWAY: "pw-g", Role.DECODE: EnvRef("DECODE_PW")})
    gateway, decode = text.split("    {\n")[1:]
    assert 'user: "gateway"' in gateway and 'password: "pw-g"' in gateway
    assert '"tandem.abort"' in gateway and "allow_responses" not in gateway
    assert '"tandem.submit"' not in gateway  # the tokenizer submits on the gateway's behalf
    assert 'user: "decode"' in decode and "password: $DECODE_PW" in decode
    assert '"tandem.decode.>"' in decode and "allow_responses: true" in decode
    with pytest.raises(ValueError):
        accounts_conf({"admin": "pw"})  # not a role


def _nats_server_accepts(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [nats_server_binary(), "-t", "-c", str(path)], env=env, capture_output=True, text=True
    )


def test_nats_server_accepts_the_rendered_configs(tmp_path):
    conf = tmp_path / "accounts.conf"
    conf.write_text(accounts_conf({role: f"pw-{role}$\"'\\" for role in Role}))
    result = _nats_server_accepts(conf, {})
    assert result.returncode == 0, result.stderr
    conf.write_text(deploy_accounts_conf())
    passwords = {password_env(role): f"{role}-pw" for role in Role}
    result = _nats_server_accepts(conf, passwords)
    assert result.returncode == 0, result.stderr
    del passwords[password_env(Role.DECODE)]
    result = _nats_server_accepts(conf, passwords)  # a password missing: it refuses to start
    assert result.returncode != 0 and "NATS_DECODE_PASSWORD" in result.stdout + result.stderr


def test_tandem_serve_gives_each_stage_its_role_s_url():
    from tandem.cli import build_parser
    from tandem.services.launcher import place_workers, plan_stages

    args = build_parser().parse_args(
        ["serve", "--model", "m", "--prefill-workers", "2", "--decode-workers", "2"]
    )
    urls = {role: f"nats://{role}:pw-{role}@127.0.0.1:4222" for role in Role}
    stages = plan_stages(args, urls, "redis://r", 50051, place_workers([0], 4, "shared"), [])
    roles = {stage.name: stage.env["NATS_URL"].split("//")[1].split(":")[0] for stage in stages}
    assert roles == {"tokenizer": "tokenizer", "scheduler": "scheduler", "gateway": "gateway",
                     "prefill-0": "prefill", "prefill-1": "prefill",
                     "decode-0": "decode", "decode-1": "decode"}  # fmt: skip
    assert all(urls[stage.role] == stage.env["NATS_URL"] for stage in stages)


def permissions_table() -> str:
    """The table of docs/nats-permissions.md, from the code."""

    def cell(patterns: list[str]) -> str:
        return "<br>".join(f"`{p}`" for p in patterns)

    rows = ["| role | publish | subscribe | answers requests |", "|---|---|---|---|"]
    for role in Role:
        perms = subjects.permissions(role)
        answers = "yes" if perms.get("allow_responses") else "no"
        rows.append(
            f"| {role} | {cell(perms['publish']['allow'])} "
            f"| {cell(perms['subscribe']['allow'])} | {answers} |"
        )
    return "\n".join(rows) + "\n"


def test_the_docs_table_is_the_code():
    doc = (REPO_ROOT / "docs" / "nats-permissions.md").read_text()
    assert permissions_table() in doc, "docs/nats-permissions.md: the table is out of date:\n" + (
        permissions_table()
    )
