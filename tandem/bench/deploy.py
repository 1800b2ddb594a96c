"""The servers `tandem bench serve` starts, and where their processes sit on the cores."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx

logger = logging.getLogger(__name__)

DEPLOYMENT_FLAGS = {"disaggregated": [], "colocated": ["--colocated"]}


def format_cpus(cpus: set[int]) -> str:
    """A core set as ranges: {0, 1, 2, 5} -> "0-2,5"."""
    parts, ordered = [], sorted(cpus)
    for i, cpu in enumerate(ordered):
        if i == 0 or cpu != ordered[i - 1] + 1:
            parts.append([cpu, cpu])
        else:
            parts[-1][1] = cpu
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def short_name(argv: list[str], comm: str = "") -> str:
    """A process's role from its command line: the `tandem` subcommand, the service module,
    or the binary's name (nats-server, redis-server)."""
    if not argv:
        return comm or "?"
    if "tandem.cli" in argv or Path(argv[0]).name == "tandem":
        i = argv.index("tandem.cli") if "tandem.cli" in argv else 0
        words = []
        for arg in argv[i + 1 :]:
            if arg.startswith("-") or len(words) == 2:
                break
            words.append(arg)
        return " ".join(words) or "tandem"
    name = Path(argv[0].split()[0]).name
    if not name.startswith("python"):
        return name
    if "-m" in argv[:-1]:
        module = argv[argv.index("-m") + 1].removeprefix("tandem.services.")
        return module.removeprefix("tandem.").split(".")[0]
    return comm or name


def children(pid: int) -> list[int]:
    """A process's children (those of every one of its threads), in pid order."""
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                kids += [int(k) for k in (task / "children").read_text().split()]
    return sorted(kids)


def process_tree(root: int) -> list[int]:
    """root and its descendants, depth first."""
    pids, stack = [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack.extend(reversed(children(pid)))
    return pids


def proc_argv(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    return [a for a in raw.split("\0") if a]


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def flag_value(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


def server_root(url: str) -> int | None:
    """The local server answering on `url`: the topmost process started with its `--port`
    (`tandem serve`'s launcher, whose gateway has the same flag, or a colocated server)."""
    port = str(urlparse(url).port)
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if flag_value(proc_argv(int(entry.name)), "--port") == port:
                    found.add(int(entry.name))
    for pid in found:
        with contextlib.suppress(OSError):
            if parent_pid(pid) not in found:
                return pid
    return None


def placement(root: int) -> list[dict]:
    """Each process of the tree: pid, role, the cores it may run on, its thread count."""
    rows = []
    for pid in process_tree(root):
        try:
            proc = Path(f"/proc/{pid}")
            argv = [a for a in proc.joinpath("cmdline").read_bytes().decode().split("\0") if a]
            comm = proc.joinpath("comm").read_text().strip()
            status = proc.joinpath("status").read_text().splitlines()
            threads = next(int(s.split()[1]) for s in status if s.startswith("Threads:"))
            cpus = format_cpus(os.sched_getaffinity(pid))
        except (OSError, StopIteration):
            continue  # gone meanwhile
        rows.append({"pid": pid, "name": short_name(argv, comm), "cpus": cpus, "threads": threads})
    return rows


def print_placement(name: str, rows: list[dict]) -> None:
    print(f"placement of {name} ({os.cpu_count()} cores; bench client on "
          f"{format_cpus(os.sched_getaffinity(0))}):")  # fmt: skip
    print(f"  {'pid':>8}  {'name':<16} {'cores':<16} threads")
    for r in rows:
        print(f"  {r['pid']:>8}  {r['name']:<16} {r['cpus']:<16} {r['threads']}")


def _log_tail(path: Path, num_chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-num_chars:]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{_log_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"server not healthy within {timeout:.0f} s:\n{_log_tail(log)}")


def _stop(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGINT to the server's process group (stop now: a SIGTERM'd worker would drain), SIGKILL
    to whatever is left after `timeout`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def deployment(serve_args: list[str], timeout: float) -> Iterator[tuple[str, int]]:
    """`tandem serve` on a free port in its own session, its log in a temp dir: (url, pid)."""
    from tandem.services.servers import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "tandem.cli", "serve", "--port", str(port), *serve_args]
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as scratch:
        log = Path(scratch) / "server.log"
        logger.info("starting %s (log %s)", shlex.join(cmd), log)
        with open(log, "wb") as out:
            # Its own session: stopping it signals its whole process group.
            env = os.environ | {"PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, proc, log, timeout)
            yield url, proc.pid
        finally:
            _stop(proc)
