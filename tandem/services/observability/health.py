"""A stage's own small HTTP endpoint for orchestrators (Docker health checks, Kubernetes
probes, a Prometheus that scrapes pods): the gateway answers these on its API port; the
other stages, which speak only gRPC and NATS, answer them on `--health-port` when given.

  GET /health   200 once the stage is up (model loaded, subscribed), 503 before; a draining
                stage stays healthy (it is finishing its work, not broken)
  GET /ready    200 while it takes new work: up and not draining
  GET /metrics  the stage's Prometheus registry (the gateway's /metrics merges every stage's)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

logger = logging.getLogger(__name__)
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HealthServer:
    """Plain asyncio HTTP/1.1 on the stage's own event loop: no framework, one request per
    connection. Being answered at all also shows the loop is not stuck."""

    def __init__(
        self, port: int, host: str = "0.0.0.0", registry: CollectorRegistry | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self.up = False
        self.draining = False
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        logger.info("health on http://%s:%d/health", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request."""
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == "/health":
            return (200, "text/plain", b"ok\n") if self.up else (503, "text/plain", b"starting\n")
        if path == "/ready":
            if self.up and not self.draining:
                return 200, "text/plain", b"ready\n"
            return 503, "text/plain", b"draining\n" if self.draining else b"starting\n"
        if path == "/metrics" and self.registry is not None:
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        return 404, "text/plain", b"not found\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            while (await asyncio.wait_for(reader.readline(), 5.0)).strip():
                pass  # headers: nothing here needs them
            parts = line.decode("latin-1").split()
            status, ctype, body = (
                self.respond(parts[0], parts[1])
                if len(parts) >= 2
                else (400, "text/plain", b"bad request\n")
            )
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Bad Request')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + (b"" if parts[:1] == ["HEAD"] else body))
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
