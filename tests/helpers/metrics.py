"""The metric names the stages export, as a scraper sees them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tandem.services.observability.metrics import (
    EngineCollector,
    RequestMetrics,
    SchedulerMetrics,
    TokenizerMetrics,
    WorkerMetrics,
)


def exported_metric_names() -> set[str]:
    """Every sample name the stages export (from their registries, as Prometheus sees them:
    Counter X is X_total)."""
    registry = CollectorRegistry()
    RequestMetrics(registry).success.labels(finished_reason="stop")
    SchedulerMetrics(registry).workers.labels(role="prefill").set(1)
    TokenizerMetrics(registry).call_seconds.labels(method="tokenize")
    WorkerMetrics(registry, "w", "decode")
    stats = dict.fromkeys(["num_running", "num_waiting", "num_blocks", "num_free_blocks",
                           "prefix_cache_queries", "prefix_cache_hits", "num_preemptions",
                           "num_steps", "num_prefill_tokens"], 1)  # fmt: skip
    registry.register(EngineCollector(lambda: stats, {"worker": "w"}))
    text = generate_latest(registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}
