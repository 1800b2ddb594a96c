"""deploy/grafana/tandem.json: each panel's query counts every stage once, however many
gateways Prometheus scrapes. Stage metrics reach Prometheus through every gateway's /metrics
(tests/helpers/promql.py), so a query must fold their per-gateway copies (`max by (worker)`)
before it adds them up; the gateway's own request metrics add up as they are."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.helpers.metrics import gateway_metric_labels, relayed_metric_labels
from tests.helpers.paths import DEPLOY_DIR
from tests.helpers.promql import parse, selectors, unfolded_relays

RELAYED = relayed_metric_labels()


def _panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", ()))


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title and refId, expression) of every panel target, rows' panels included."""
    dashboard = json.loads((DEPLOY_DIR / "grafana" / "tandem.json").read_text())
    return [(f"{p['title']} {t['refId']}", t["expr"])
            for p in _panels(dashboard["panels"]) for t in p.get("targets", ())]  # fmt: skip


QUERIES = dashboard_queries()


def test_relayed_and_gateway_metrics_are_told_apart():
    assert not set(RELAYED) & set(gateway_metric_labels())
    assert RELAYED["vllm:num_requests_running"] == {"worker", "role"}
    assert "tandem:scheduler_waiting_tokens" in RELAYED
    assert "tandem:requests_received_total" not in RELAYED


@pytest.mark.parametrize("where, query", QUERIES, ids=[w for w, _ in QUERIES])
def test_each_panel_counts_every_stage_once(where, query):
    assert unfolded_relays(query, RELAYED) == []


@pytest.mark.parametrize(
    "query, problem",
    [
        ("sum(tandem:scheduler_queue_depth)", "sum adds up"),
        ('sum by (worker) (vllm:num_requests_running{role="decode"})', "sum adds up"),
        ("sum by (worker) (rate(tandem:prefill_tokens_total[1m]))", "sum adds up"),
        ("vllm:kv_cache_usage_perc", "not aggregated"),
        ("sum by (role) (tandem:workers)", "sum adds up"),
        ("avg(max(vllm:kv_cache_usage_perc))", "must keep worker"),
        (
            "histogram_quantile(0.5, sum by (le) (max by (worker) "
            "(rate(tandem:engine_step_seconds_bucket[1m]))))",
            "must keep le",
        ),  # fmt: skip
        (
            "histogram_quantile(0.5, sum by (le) (rate(tandem:detokenize_batch_seconds_bucket"
            "[$__rate_interval])))",
            "sum adds up",
        ),  # fmt: skip
        ("max without (worker) (vllm:num_requests_running)", "must drop instance only"),
    ],
)
def test_the_check_finds_copies_added_up(query, problem):
    assert any(problem in p for p in unfolded_relays(query, RELAYED))


@pytest.mark.parametrize(
    "query",
    [
        "sum(rate(tandem:requests_received_total[1m]))",  # the gateway's own: add up
        'sum(max by (worker) (vllm:num_requests_running{role="decode"}))',
        "max(tandem:scheduler_waiting_tokens)",  # one scheduler
        "max by (role) (tandem:workers)",
        "sum(max without (instance) (rate(vllm:num_preemptions_total[1m])))",
        "histogram_quantile(0.99, sum by (le) (max by (le, worker) "
        "(rate(tandem:engine_step_seconds_bucket[1m]))))",
        "histogram_quantile(0.5, sum by (le, method) (max by (le, method) "
        "(rate(tandem:tokenizer_call_seconds_bucket[1m]))))",
    ],
)
def test_the_check_passes_folded_queries(query):
    assert unfolded_relays(query, RELAYED) == []


def test_every_query_parses_and_reads_exported_metrics():
    names = set(RELAYED) | set(gateway_metric_labels())
    for where, query in QUERIES:
        for selector, _ in selectors(parse(query)):
            assert selector.name in names, where


def test_the_autoscalers_count_every_stage_once():
    keda = yaml.safe_load_all((DEPLOY_DIR / "k8s" / "keda.yaml").read_text())
    queries = [t["metadata"]["query"] for d in keda for t in d["spec"]["triggers"]]
    assert queries
    for query in queries:
        assert unfolded_relays(query, RELAYED) == [], query
