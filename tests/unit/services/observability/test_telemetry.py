"""The pure parts of observability: metric merging, the request clock, the OTLP JSON form
of spans, the waterfall, and the log formats."""

from __future__ import annotations

import json
import logging

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tandem.services.observability import tracing
from tandem.services.observability.logs import JsonFormatter, TextFormatter, log_event
from tandem.services.observability.metrics import EngineCollector, RequestMetrics, RequestTimer
from tandem.services.observability.metrics_push import merge_expositions
from tests.helpers.metrics import exported_metric_names
from tests.helpers.paths import DEPLOY_DIR


def _samples(text: str) -> dict:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_merge_joins_families_of_every_instance_and_adds_the_model_name():
    texts = []
    for worker, hits in (("prefill-0", 3), ("decode-0", 5)):
        stats = {"num_running": 1, "num_waiting": 0, "num_blocks": 10, "num_free_blocks": 4,
                 "prefix_cache_queries": 8, "prefix_cache_hits": hits, "num_preemptions": 0,
                 "num_steps": 2, "num_prefill_tokens": 7, "block_size": 16,
                 "kv_cache_dtype": "auto"}  # fmt: skip
        r = CollectorRegistry()
        r.register(EngineCollector(lambda s=stats: s, {"worker": worker, "role": "x"}))
        texts.append(generate_latest(r).decode())
    merged = merge_expositions(texts, "m").decode()
    assert merged.count("# TYPE vllm:prefix_cache_hits_total counter") == 1
    samples = _samples(merged)
    key = ("vllm:prefix_cache_hits_total", (("model_name", "m"), ("role", "x"), ("worker", "d")))
    assert samples[key[0], (key[1][0], key[1][1], ("worker", "decode-0"))] == 5
    assert samples[key[0], (key[1][0], key[1][1], ("worker", "prefill-0"))] == 3
    usage = (
        "vllm:kv_cache_usage_perc",
        (("model_name", "m"), ("role", "x"), ("worker", "decode-0")),
    )
    assert abs(samples[usage] - 0.6) < 1e-9


def test_merge_keeps_a_model_name_already_there():
    r = CollectorRegistry()
    Counter("c", "doc", ["model_name"], registry=r).labels(model_name="other").inc()
    samples = _samples(merge_expositions([generate_latest(r).decode()], "m").decode())
    assert samples == {("c_total", (("model_name", "other"),)): 1.0}


def test_merge_skips_an_exposition_that_does_not_parse_and_keeps_the_rest():
    r = CollectorRegistry()
    Counter("c", "doc", registry=r).inc()
    texts = ['a{b="c} nan nan\n', generate_latest(r).decode()]
    samples = _samples(merge_expositions(texts, "m").decode())
    assert samples == {("c_total", (("model_name", "m"),)): 1.0}


def test_request_timer_counts_one_itl_per_token_after_the_first(monkeypatch):
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry)
    clock = iter([0.0, 0.5, 0.7, 1.3, 1.4])
    monkeypatch.setattr("tandem.services.observability.metrics.time.monotonic", lambda: next(clock))
    timer = RequestTimer(metrics)  # t=0
    timer.on_tokens(1)  # t=0.5: TTFT
    timer.on_tokens(1)  # t=0.7: gap 0.2
    timer.on_tokens(3)  # t=1.3: three tokens share 0.6
    assert timer.finish(10, timer.num_tokens, "length") == 1.4
    s = _samples(generate_latest(registry).decode())
    assert s["vllm:time_to_first_token_seconds_sum", ()] == 0.5
    assert s["vllm:inter_token_latency_seconds_count", ()] == 4
    assert abs(s["vllm:inter_token_latency_seconds_sum", ()] - 0.8) < 1e-9
    assert s["vllm:generation_tokens_total", ()] == 5
    assert s["vllm:prompt_tokens_total", ()] == 10
    assert s["vllm:request_success_total", (("finished_reason", "length"),)] == 1
    assert s["tandem:requests_in_flight", ()] == 0


def test_a_failed_request_is_not_a_success():
    registry = CollectorRegistry()
    timer = RequestTimer(RequestMetrics(registry))
    timer.finish(3, 0, None)
    timer.finish(3, 0, "stop")  # a second end changes nothing
    s = _samples(generate_latest(registry).decode())
    assert s["tandem:requests_failed_total", ()] == 1
    assert ("vllm:request_success_total", (("finished_reason", "stop"),)) not in s
    assert s["vllm:e2e_request_latency_seconds_count", ()] == 0


def test_tracing_off_injects_nothing():
    assert not tracing.enabled()
    assert tracing.inject() == {}
    assert tracing.extract({}, None) is None
    span = tracing.start_span("x", None)
    assert not span.is_recording()


def test_spans_as_otlp_json_lines_and_a_waterfall(tmp_path):
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    path = tmp_path / "spans.jsonl"
    exporter = tracing.JsonLinesSpanExporter(str(path))
    provider = TracerProvider(resource=Resource.create({"service.name": "gateway"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    root = tracer.start_span("POST /v1/completions", attributes={"gen_ai.request.id": "cmpl-1"})
    ctx = tracing.trace.set_span_in_context(root)
    child = tracer.start_span("decode", context=ctx, attributes={"gen_ai.request.id": "cmpl-1-0",
                                                                 "n": 3, "ok": True})  # fmt: skip
    child.end()
    root.end()
    other = tracer.start_span("POST /v1/completions", attributes={"gen_ai.request.id": "x"})
    other.end()
    provider.shutdown()

    lines = path.read_text().splitlines()
    assert len(lines) == 3
    doc = json.loads(lines[0])
    (rs,) = doc["resourceSpans"]
    assert {"key": "service.name", "value": {"stringValue": "gateway"}} in rs["resource"][
        "attributes"
    ]
    (span,) = rs["scopeSpans"][0]["spans"]
    assert span["name"] == "decode" and len(span["traceId"]) == 32 and len(span["spanId"]) == 16
    assert span["kind"] == 1  # SPAN_KIND_INTERNAL
    assert int(span["endTimeUnixNano"]) >= int(span["startTimeUnixNano"]) > 0
    assert {"key": "n", "value": {"intValue": "3"}} in span["attributes"]

    spans = tracing.request_trace(tracing.read_spans(str(path)), "cmpl-1")
    assert [(s["name"], s["depth"]) for s in spans] == [("POST /v1/completions", 0), ("decode", 1)]
    assert spans[1]["attributes"] == {"gen_ai.request.id": "cmpl-1-0", "n": 3, "ok": True}
    text = tracing.waterfall(spans)
    assert "gateway" in text and "  decode" in text and "#" in text


def test_log_lines_in_text_and_json():
    record = logging.LogRecord("tandem.requests", logging.INFO, "f", 1, "request r done", (), None)
    record.tandem_fields = {"request_id": "r", "ttft_ms": 12.5}
    entry = json.loads(JsonFormatter("gateway").format(record))
    assert entry["message"] == "request r done" and entry["stage"] == "gateway"
    assert entry["request_id"] == "r" and entry["ttft_ms"] == 12.5
    assert TextFormatter().format(record).endswith("request r done request_id=r ttft_ms=12.5")


def test_log_event_attaches_fields(caplog):
    with caplog.at_level(logging.INFO):
        log_event(logging.getLogger("tandem.t"), "hello", a=1)
    assert caplog.records[-1].tandem_fields == {"a": 1}


def test_the_grafana_dashboard_queries_only_exported_metrics():
    import re

    path = DEPLOY_DIR / "grafana" / "tandem.json"
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    assert len(exprs) > 20
    used = {m for e in exprs for m in re.findall(r"\b((?:vllm|tandem):[a-z0-9_:]+)", e)}
    exported = exported_metric_names()
    assert used - exported == set()
    # the families an autoscaler reads are all on it
    for name in ("tandem:scheduler_waiting_tokens", "vllm:num_requests_running",
                 "vllm:kv_cache_usage_perc", "tandem:requests_received_total"):  # fmt: skip
        assert name in used
