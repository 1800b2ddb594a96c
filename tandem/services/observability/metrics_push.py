"""How the whole cluster's metrics reach the gateway's /metrics.

Every stage keeps its own registry (metrics.py) and pushes it over NATS once a second
(`tandem.metrics`, a MetricsSnapshot holding Prometheus' text format); the gateway merges
the latest snapshot of each live instance with its own request metrics. Stages find each
other only through NATS, so this needs no scrape target per worker and no service
discovery: one scrape of the gateway sees every stage (and vLLM's Grafana dashboards,
which expect one `vllm:` family across engines, work unchanged). A process that stops
pushing drops out after SNAPSHOT_TTL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tandem.v1 import engine_pb2

logger = logging.getLogger(__name__)

PUSH_INTERVAL = 1.0  # seconds between a stage's snapshots
SNAPSHOT_TTL = 15.0  # a stage silent this long leaves /metrics


class MetricsPublisher:
    """Pushes a stage's registry over NATS every PUSH_INTERVAL (see the module doc)."""

    def __init__(self, bus, registry: CollectorRegistry, instance: str, stage: str) -> None:
        self.bus = bus
        self.registry = registry
        self.instance = instance
        self.stage = stage
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def publish(self) -> None:
        from tandem.services.transport.subjects import subject

        msg = engine_pb2.MetricsSnapshot(
            instance=self.instance,
            stage=self.stage,
            timestamp=time.time(),
            exposition=generate_latest(self.registry).decode(),
        )
        await self.bus.publish(subject("metrics"), msg)

    async def _run(self) -> None:
        while True:
            try:
                await self.publish()
            except Exception as e:  # NATS away for a moment: the next push catches up
                logger.debug("metrics push failed: %s", e)
            await asyncio.sleep(PUSH_INTERVAL)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


def merge_expositions(texts: list[str], model_name: str) -> bytes:
    """Several expositions as one: families joined by name, `model_name` added where a
    sample lacks it (the gateway's /metrics)."""
    merged: dict[str, object] = {}
    for text in texts:
        try:
            families = list(text_string_to_metric_families(text))
        except Exception as e:  # one bad snapshot must not cost the whole page
            logger.warning("a metrics exposition skipped: it does not parse (%s)", e)
            continue
        for family in families:
            into = merged.get(family.name)
            if into is None:
                merged[family.name] = family
            elif into.type != family.type:
                logger.warning("metric %s skipped from one exposition: its type differs",
                               family.name)  # fmt: skip
            else:
                into.samples.extend(family.samples)
    for family in merged.values():
        family.samples = [
            s
            if "model_name" in s.labels
            else s._replace(labels={"model_name": model_name, **s.labels})
            for s in family.samples
        ]
    rendered = []
    for family in merged.values():
        out = CollectorRegistry(auto_describe=False)
        out.register(_Families([family]))
        try:
            rendered.append(generate_latest(out))
        except Exception as e:
            logger.warning("metric %s skipped: it does not render (%s)", family.name, e)
    return b"".join(rendered)


class SnapshotStore:
    """The latest MetricsSnapshot of every instance; an instance silent for SNAPSHOT_TTL
    is forgotten."""

    def __init__(self) -> None:
        self._latest: dict[str, tuple[float, str]] = {}

    def add(self, snapshot: engine_pb2.MetricsSnapshot) -> None:
        self._latest[snapshot.instance] = (time.monotonic(), snapshot.exposition)

    def texts(self) -> list[str]:
        now = time.monotonic()
        self._latest = {k: v for k, v in self._latest.items() if now - v[0] < SNAPSHOT_TTL}
        return [text for _, text in self._latest.values()]


class _Families:
    def __init__(self, families) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


def instance_name(stage: str) -> str:
    return f"{stage}-{os.uname().nodename}-{os.getpid()}"
