"""OpenTelemetry tracing: one trace per request, through every stage.

Each stage calls `setup_tracing(service_name, ...)` once at start. With no exporter asked
for, no SDK provider is installed: every span is the API's non-recording span and the
stages skip their span bookkeeping (`enabled()` is False), so tracing off costs nothing.

Context crosses stages as W3C trace context (`traceparent`): in gRPC metadata for the
tokenizer's calls, in NATS message headers for messages about one request (submit, KV
hand-off, preempted), and in `RequestSpec.trace_context` where one message carries many
requests (a step plan). Every stage's spans of a request are children of the gateway's
request span, so a trace reads as a flat waterfall of the stages.

`--trace-file PATH` appends each finished span as one line of OTLP's JSON encoding (one
`resourceSpans` entry holding the span, its resource's `service.name` the stage), every
stage into the same file; `--otlp-traces-endpoint URL` exports OTLP over HTTP/protobuf
(e.g. http://localhost:4318/v1/traces) to Jaeger, Tempo or a collector.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

TRACER_NAME = "tandem"
_enabled = False


def setup_tracing(
    service_name: str,
    otlp_endpoint: str | None = None,
    trace_file: str | None = None,
    sample_ratio: float = 1.0,
) -> bool:
    """Install a tracer provider exporting to the given sinks; nothing when none is given.
    `sample_ratio` of new traces are kept (the gateway decides; the other stages follow the
    decision carried in the context). Returns whether tracing is on."""
    global _enabled
    if not otlp_endpoint and not trace_file:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
    )
    if trace_file:
        provider.add_span_processor(
            BatchSpanProcessor(JsonLinesSpanExporter(trace_file), schedule_delay_millis=200)
        )
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    trace.set_tracer_provider(provider)
    _enabled = True
    return True


def shutdown_tracing() -> None:
    """Flush what is buffered (a stage calls this on its way out)."""
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def enabled() -> bool:
    return _enabled


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def inject(span: Span | None = None) -> dict[str, str]:
    """The W3C trace context of `span` (or of the current span) as a carrier dict."""
    carrier: dict[str, str] = {}
    if _enabled:
        ctx = trace.set_span_in_context(span) if span is not None else None
        propagate.inject(carrier, context=ctx)
    return carrier


def extract(*carriers: Mapping[str, str] | None) -> Context | None:
    """The context of the first carrier that holds one (NATS headers, a spec's map, gRPC
    metadata as a dict); None when none does."""
    for carrier in carriers:
        if carrier and "traceparent" in carrier:
            return propagate.extract(dict(carrier))
    return None


def start_span(
    name: str,
    parent: Context | None,
    attributes: Mapping | None = None,
    start_ns: int | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
) -> Span:
    """A span under `parent` (a context from `extract`); the root of a new trace when None."""
    return tracer().start_span(
        name, context=parent, kind=kind, attributes=attributes, start_time=start_ns
    )


def record_span(
    name: str,
    parent: Context | None,
    start_ns: int,
    end_ns: int,
    attributes: Mapping | None = None,
) -> None:
    """A span whose times are already known (one request's share of an engine step)."""
    span = start_span(name, parent, attributes, start_ns)
    span.end(end_time=end_ns)


def record_compile_span(
    parent: Context, request_id: str, start_ns: int, end_ns: int, hit: bool, error
) -> None:
    """A structured output's grammar compile (or cache hit) on a worker, under `parent`."""
    attributes = {"gen_ai.request.id": request_id, "tandem.grammar.cache_hit": hit}
    span = start_span("structured_output.compile", parent, attributes, start_ns)
    end_span(span, error, end_ns)


def context_of(span: Span) -> Context:
    """A context whose current span is `span` (to start spans under it)."""
    return trace.set_span_in_context(span)


def end_span(span: Span, error: str | None = None, end_ns: int | None = None) -> None:
    if error:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=end_ns)


@contextmanager
def server_span(name: str, metadata: Sequence[tuple[str, str]] | None) -> Iterator[Span]:
    """The server side of a gRPC call: a span under the caller's context from metadata."""
    parent = extract(dict(metadata or ()))
    with tracer().start_as_current_span(name, context=parent, kind=SpanKind.SERVER) as span:
        yield span


def grpc_metadata() -> tuple[tuple[str, str], ...] | None:
    """The current context as gRPC call metadata (None when tracing is off)."""
    carrier = inject()
    return tuple(carrier.items()) or None


def now_ns() -> int:
    return time.time_ns()


class JsonLinesSpanExporter:
    """Appends each span as one line of OTLP JSON. Several processes may share the file:
    each line goes out in one O_APPEND write, so lines never interleave."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def export(self, spans) -> object:
        from opentelemetry.sdk.trace.export import SpanExportResult

        with self._lock:
            for span in spans:
                line = json.dumps(span_to_otlp_json(span), separators=(",", ":")) + "\n"
                os.write(self._fd, line.encode())
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True

    def shutdown(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def span_to_otlp_json(span) -> dict:
    """One SDK span as an OTLP/JSON `{"resourceSpans": [...]}` document (ids in hex, times
    as decimal strings of nanoseconds, as OTLP's JSON mapping says)."""
    ctx = span.context
    body = {
        "traceId": f"{ctx.trace_id:032x}",
        "spanId": f"{ctx.span_id:016x}",
        "name": span.name,
        "kind": span.kind.value + 1,  # OTLP counts SPAN_KIND_UNSPECIFIED as 0
        "startTimeUnixNano": str(span.start_time),
        "endTimeUnixNano": str(span.end_time),
        "attributes": _attributes(span.attributes),
        "status": {"code": span.status.status_code.value},
    }
    if span.parent is not None:
        body["parentSpanId"] = f"{span.parent.span_id:016x}"
    if span.status.description:
        body["status"]["message"] = span.status.description
    if span.events:
        body["events"] = [
            {
                "timeUnixNano": str(e.timestamp),
                "name": e.name,
                "attributes": _attributes(e.attributes),
            }
            for e in span.events
        ]
    scope = span.instrumentation_scope
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": _attributes(span.resource.attributes)},
                "scopeSpans": [{"scope": {"name": scope.name if scope else ""}, "spans": [body]}],
            }
        ]
    }


def _attributes(attrs) -> list[dict]:
    return [{"key": k, "value": _any_value(v)} for k, v in (attrs or {}).items()]


def _any_value(v) -> dict:
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    if isinstance(v, float):
        return {"doubleValue": v}
    if isinstance(v, (list, tuple)):
        return {"arrayValue": {"values": [_any_value(x) for x in v]}}
    return {"stringValue": str(v)}


def read_spans(path: str) -> list[dict]:
    """Every span in a trace file, flattened: {service, trace_id, span_id, parent_id, name,
    start_ns, end_ns, attributes} (attributes as plain values)."""
    spans = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            for rs in json.loads(line).get("resourceSpans", ()):
                resource = _plain(rs.get("resource", {}).get("attributes", ()))
                for ss in rs.get("scopeSpans", ()):
                    for s in ss.get("spans", ()):
                        spans.append(
                            {
                                "service": resource.get("service.name", "?"),
                                "trace_id": s["traceId"],
                                "span_id": s["spanId"],
                                "parent_id": s.get("parentSpanId"),
                                "name": s["name"],
                                "start_ns": int(s["startTimeUnixNano"]),
                                "end_ns": int(s["endTimeUnixNano"]),
                                "attributes": _plain(s.get("attributes", ())),
                                "status": s.get("status", {}),
                            }
                        )
    return spans


def _plain(attrs) -> dict:
    out = {}
    for a in attrs:
        ((kind, value),) = a["value"].items()
        out[a["key"]] = int(value) if kind == "intValue" else value
    return out


def request_trace(spans: list[dict], request_id: str) -> list[dict]:
    """The spans of the trace of an API request id (as the API returned it; the engine's
    ids `<id>-<i>` of its prompts match too), parents before children, by start time."""
    trace_ids = {
        s["trace_id"]
        for s in spans
        if str(s["attributes"].get("gen_ai.request.id", "")) == request_id
    }
    if not trace_ids:
        trace_ids = {
            s["trace_id"]
            for s in spans
            if str(s["attributes"].get("gen_ai.request.id", "")).startswith(request_id + "-")
        }
    chosen = [s for s in spans if s["trace_id"] in trace_ids]
    children: dict[str | None, list[dict]] = {}
    ids = {s["span_id"] for s in chosen}
    for s in sorted(chosen, key=lambda s: s["start_ns"]):
        parent = s["parent_id"] if s["parent_id"] in ids else None
        children.setdefault(parent, []).append(s)
    ordered: list[dict] = []

    def walk(parent, depth):
        for s in children.get(parent, ()):
            ordered.append(dict(s, depth=depth))
            walk(s["span_id"], depth + 1)

    walk(None, 0)
    return ordered


def waterfall(spans: list[dict], width: int = 48) -> str:
    """Spans (from request_trace) as text: offset and duration in ms, stage, name, a bar."""
    if not spans:
        return "no spans"
    t0 = min(s["start_ns"] for s in spans)
    total = max(max(s["end_ns"] for s in spans) - t0, 1)
    lines = [f"trace {spans[0]['trace_id']}  ({total / 1e6:.1f} ms)"]
    lines.append(f"{'start ms':>9} {'dur ms':>9}  {'stage':<10} {'span':<28} timeline")
    for s in spans:
        begin = int(width * (s["start_ns"] - t0) / total)
        length = max(1, int(width * (s["end_ns"] - s["start_ns"]) / total))
        bar = " " * begin + "#" * min(length, width - begin)
        name = "  " * s.get("depth", 0) + s["name"]
        lines.append(
            f"{(s['start_ns'] - t0) / 1e6:9.1f} {(s['end_ns'] - s['start_ns']) / 1e6:9.1f}  "
            f"{s['service']:<10} {name:<28} |{bar:<{width}}|"
        )
    return "\n".join(lines)
