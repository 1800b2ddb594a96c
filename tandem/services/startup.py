"""What `tandem serve` says while its cluster comes up: a line per stage as it becomes ready,
and every few seconds, while something is slow, what it is still waiting for.

Nothing here needs a port of its own: the tokenizer is ready once its gRPC port takes
connections, the gateway once its HTTP port answers, and the gateway's /stats shows the rest
as it hears from them (the scheduler's stats, each worker's heartbeats, which start once the
worker has loaded its model). The lines go to the log (stderr); stdout stays for the URL."""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.request
from collections.abc import Callable, Iterable

from tandem.services.transport.subjects import Role

logger = logging.getLogger(__name__)
REMIND_S = 5.0  # seconds between two "still waiting for" lines

# What a stage is doing until it is seen ready.
WAITS_FOR = {
    Role.TOKENIZER: "waiting for gRPC ready",
    Role.SCHEDULER: "waiting for its first stats",
    Role.PREFILL: "loading the model",
    Role.DECODE: "loading the model",
    Role.GATEWAY: "waiting for its HTTP port",
}


class StartupProgress:
    """Which stages are not ready yet and what each waits for. `ready` logs a stage's line
    once; `remind` logs what is left when `remind_s` passed since the last line. The clock
    is injected."""

    def __init__(
        self,
        waiting: dict[str, str],
        clock: Callable[[], float] = time.monotonic,
        remind_s: float = REMIND_S,
    ) -> None:
        self.waiting = dict(waiting)  # stage name -> what it waits for
        self.clock = clock
        self.remind_s = remind_s
        self.started_at = self.last_line_at = clock()

    def elapsed(self) -> float:
        return self.clock() - self.started_at

    def ready(self, name: str, detail: str) -> None:
        if self.waiting.pop(name, None) is None:
            return
        logger.info("%s: %s (%.1f s)", name, detail, self.elapsed())
        self.last_line_at = self.clock()

    def remind(self) -> None:
        if not self.waiting or self.clock() - self.last_line_at < self.remind_s:
            return
        pending = ", ".join(f"{name} ({what})" for name, what in self.waiting.items())
        logger.info("still waiting after %.0f s: %s", self.elapsed(), pending)
        self.last_line_at = self.clock()


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), 0.2):
            return True
    except OSError:
        return False


def gateway_stats(url: str) -> dict | None:
    """The gateway's /stats, or None while it does not answer."""
    try:
        with urllib.request.urlopen(f"{url}/stats", timeout=1) as r:
            return json.loads(r.read())
    except Exception:
        return None


def observe(
    progress: StartupProgress,
    url: str,
    tokenizer_port: int,
    workers: Iterable[str],
) -> None:
    """One look at the stages not ready yet (`workers`: the worker stages' names, which are
    their worker ids)."""
    if "tokenizer" in progress.waiting and port_open("127.0.0.1", tokenizer_port):
        progress.ready("tokenizer", f"gRPC ready on 127.0.0.1:{tokenizer_port}")
    stats = gateway_stats(url)
    if stats is None:
        return
    progress.ready("gateway", f"listening on {url}")
    if "scheduler" in progress.waiting and stats.get("scheduler"):
        progress.ready("scheduler", "up (its stats reach the gateway)")
    # a worker started again has its id with a suffix (prefill-0.1)
    seen = {worker_id.split(".")[0]: w for worker_id, w in (stats.get("workers") or {}).items()}
    for name in workers:
        if name in seen:
            blocks = seen[name].get("num_blocks")
            progress.ready(name, f"model loaded, heartbeating ({blocks} KV blocks)")
