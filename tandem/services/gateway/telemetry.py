"""The gateway's side of observability: one span per API request (the root of its trace),
the request metrics (TTFT, ITL, E2E, tokens), and one log line per finished request."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry, generate_latest

from tandem.engine.client import GenerationChunk
from tandem.engine.request import SamplingParams
from tandem.services.observability import tracing
from tandem.services.observability.logs import log_event
from tandem.services.observability.metrics import RequestMetrics, RequestTimer
from tandem.services.observability.metrics_push import merge_expositions

logger = logging.getLogger("tandem.requests")


class Telemetry:
    """Owns the gateway's registry; `observe` starts one API request's span and clocks."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.metrics = RequestMetrics(self.registry)

    def observe(self, route: str, request_id: str, params: SamplingParams) -> ApiRequest:
        return ApiRequest(self, route, request_id, params)

    def exposition(self, engine_texts: list[str]) -> bytes:
        """The whole cluster's metrics: the gateway's own and every stage's latest."""
        own = generate_latest(self.registry).decode()
        return merge_expositions([own, *engine_texts], self.model_name)


class ApiRequest:
    """One API call: its span (`gen_ai.*` attributes, as vLLM sets them), and one timer per
    engine request it runs (a completion with a list of prompts runs several)."""

    def __init__(
        self, telemetry: Telemetry, route: str, request_id: str, params: SamplingParams
    ) -> None:
        self.telemetry = telemetry
        self.request_id = request_id
        self.start = time.monotonic()
        self.span = tracing.start_span(
            f"POST {route}",
            None,
            {
                "gen_ai.request.id": request_id,
                "gen_ai.response.model": telemetry.model_name,
                "gen_ai.request.max_tokens": params.max_tokens,
                "gen_ai.request.temperature": params.temperature,
                "gen_ai.request.top_p": params.top_p,
                "http.route": route,
            },
            kind=SpanKind.SERVER,
        )
        self.trace_context = tracing.inject(self.span)
        self.trace_id = f"{self.span.get_span_context().trace_id:032x}"
        self._open_streams = 0
        self._ended = False
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft: float | None = None

    @contextlib.contextmanager
    def active(self):
        """Make the request's span current (calls made inside carry its context)."""
        with trace.use_span(self.span, end_on_exit=False):
            yield

    @contextlib.contextmanager
    def failing(self):
        """Code before the streams start: an exception there ends the span as an error."""
        try:
            yield
        except BaseException as e:
            self.end(getattr(e, "message", None) or str(e) or type(e).__name__)
            raise

    def watch(
        self, engine_request_id: str, num_prompt_tokens: int, stream
    ) -> AsyncIterator[GenerationChunk]:
        """Pass a request's chunks through, clocking them; log and count it at its end. The
        span ends after the last watched stream."""
        self._open_streams += 1
        return self._watch(engine_request_id, num_prompt_tokens, stream)

    async def _watch(
        self, engine_request_id: str, num_prompt_tokens: int, stream
    ) -> AsyncIterator[GenerationChunk]:
        timer = RequestTimer(self.telemetry.metrics, self.start)
        finish_reason = None
        error = None
        try:
            async for chunk in stream:
                timer.on_tokens(len(chunk.token_ids), chunk.produced_at)
                finish_reason = chunk.finish_reason or finish_reason
                yield chunk
        except Exception as e:
            error = str(e)
            raise
        finally:
            e2e = timer.finish(num_prompt_tokens, timer.num_tokens, finish_reason)
            self.prompt_tokens += num_prompt_tokens
            self.completion_tokens += timer.num_tokens
            if timer.ttft is not None:
                self.ttft = timer.ttft if self.ttft is None else min(self.ttft, timer.ttft)
            log_event(
                logger,
                f"request {engine_request_id} {'finished' if finish_reason else 'failed'}",
                request_id=engine_request_id,
                trace_id=self.trace_id if tracing.enabled() else None,
                prompt_tokens=num_prompt_tokens,
                completion_tokens=timer.num_tokens,
                finish_reason=finish_reason or "error",
                ttft_ms=round(1000 * timer.ttft, 2) if timer.ttft is not None else None,
                e2e_ms=round(1000 * e2e, 2),
            )
            self._open_streams -= 1
            if self._open_streams == 0:
                self.end(error)

    def end(self, error: str | None = None) -> None:
        """End the span (once): after the last stream, or when the call failed early."""
        if self._ended:
            return
        self._ended = True
        span = self.span
        span.set_attribute("gen_ai.usage.prompt_tokens", self.prompt_tokens)
        span.set_attribute("gen_ai.usage.completion_tokens", self.completion_tokens)
        span.set_attribute("gen_ai.latency.e2e", time.monotonic() - self.start)
        if self.ttft is not None:
            span.set_attribute("gen_ai.latency.time_to_first_token", self.ttft)
        tracing.end_span(span, error)
