"""The metric names the stages export, as a scraper sees them, and who exports them: the
gateway's own request metrics, and the metrics every other stage pushes over NATS, which
each gateway's /metrics relays (so a Prometheus that scrapes N gateways holds N copies)."""

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


def _sample_labels(registry: CollectorRegistry) -> dict[str, set[str]]:
    """Sample name (Counter X is X_total) -> its label names, as Prometheus sees them."""
    text = generate_latest(registry).decode()
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def gateway_metric_labels() -> dict[str, set[str]]:
    """The gateway's own request metrics: each gateway counts the requests it served."""
    registry = CollectorRegistry()
    RequestMetrics(registry).success.labels(finished_reason="stop")
    return _sample_labels(registry)


def relayed_metric_labels() -> dict[str, set[str]]:
    """The metrics the other stages push over NATS (the scheduler's, the tokenizer's, each
    worker's, labelled with `worker` and `role`), which every gateway relays."""
    registry = CollectorRegistry()
    SchedulerMetrics(registry).workers.labels(role="prefill").set(1)
    TokenizerMetrics(registry).call_seconds.labels(method="tokenize")
    WorkerMetrics(registry, "w", "decode")
    stats = dict.fromkeys(["num_running", "num_waiting", "num_blocks", "num_free_blocks",
                           "prefix_cache_queries", "prefix_cache_hits", "num_preemptions",
                           "num_steps", "num_prefill_tokens", "block_size"], 1)  # fmt: skip
    stats["kv_cache_dtype"] = "auto"
    registry.register(EngineCollector(lambda: stats, {"worker": "w", "role": "decode"}))
    return _sample_labels(registry)


def exported_metric_names() -> set[str]:
    """Every sample name the stages export (from their registries, as Prometheus sees them:
    Counter X is X_total)."""
    return set(gateway_metric_labels()) | set(relayed_metric_labels())
