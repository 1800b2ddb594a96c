"""Prometheus metrics with vLLM's names: what each stage measures.

Families, labels and buckets follow vLLM V1 where the meaning is the same; `model_name` is
added by the gateway, `worker` and `role` by each worker. Tandem's own (per stage, the
signals a per-stage autoscaler reads) are prefixed `tandem:`. How every stage's registry
reaches the gateway's /metrics: metrics_push.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

logger = logging.getLogger(__name__)
prometheus_client.disable_created_metrics()  # no `_created` samples: as vLLM's output


# vLLM V1's buckets.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                           30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0,
                           7680.0)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
# Tandem's own.
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                2.5, 5.0, 10.0)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)


class RequestMetrics:
    """Per-request latencies and token counts, measured where the client sees them: at the
    gateway (both deployments)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds (tokens arriving together share "
            "their gap).",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_len = Histogram(
            "vllm:request_prompt_tokens",
            "Number of prefill tokens processed.",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.gen_len = Histogram(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", registry=r
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", registry=r
        )
        self.success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            ["finished_reason"],
            registry=r,
        )
        self.received = Counter(
            "tandem:requests_received",
            "Generation requests admitted by the gateway (rate: the gateway's load).",
            registry=r,
        )
        self.failed = Counter(
            "tandem:requests_failed", "Requests that ended in an error.", registry=r
        )
        self.in_flight = Gauge(
            "tandem:requests_in_flight", "Requests the gateway is streaming.", registry=r
        )
        self.stream_lag = Histogram(
            "tandem:token_stream_lag_seconds",
            "Time from a worker's step producing tokens to the gateway receiving their text.",
            buckets=FAST_BUCKETS,
            registry=r,
        )


class RequestTimer:
    """One request's clock at the gateway: first token, the gaps after it, the end."""

    def __init__(self, metrics: RequestMetrics, start: float | None = None) -> None:
        self.metrics = metrics
        self.start = time.monotonic() if start is None else start
        self.last: float | None = None
        self.ttft: float | None = None
        self.num_tokens = 0
        metrics.received.inc()
        metrics.in_flight.inc()
        self._open = True

    def on_tokens(self, n: int, produced_at: float = 0.0) -> None:
        """`n` tokens arrived (their step's wall-clock time `produced_at`, when known)."""
        if n <= 0:
            return
        now = time.monotonic()
        self.num_tokens += n
        if produced_at:
            self.metrics.stream_lag.observe(max(time.time() - produced_at, 0.0))
        if self.last is None:
            self.ttft = now - self.start
            self.metrics.ttft.observe(self.ttft)
            num_gaps, gap = n - 1, 0.0
        else:
            num_gaps, gap = n, (now - self.last) / n
        for _ in range(num_gaps):
            self.metrics.itl.observe(gap)
        self.last = now

    def finish(self, num_prompt_tokens: int, num_tokens: int, finish_reason: str | None) -> float:
        """Record a request that ended (finish_reason None: it failed). Returns E2E seconds."""
        e2e = time.monotonic() - self.start
        if not self._open:
            return e2e
        self._open = False
        m = self.metrics
        m.in_flight.dec()
        if finish_reason is None:
            m.failed.inc()
            return e2e
        m.e2e.observe(e2e)
        m.prompt_len.observe(num_prompt_tokens)
        m.gen_len.observe(num_tokens)
        m.prompt_tokens.inc(num_prompt_tokens)
        m.generation_tokens.inc(num_tokens)
        m.success.labels(finished_reason=finish_reason).inc()
        return e2e


class EngineCollector:
    """vLLM's per-engine gauges and counters, read from an engine's state at each scrape (so
    they are exact, with no bookkeeping on the engine's hot path)."""

    def __init__(self, stats: Callable[[], dict | None], labels: dict[str, str]) -> None:
        self.stats = stats
        self.labels = labels

    def collect(self):
        s = self.stats()
        if s is None:
            return
        names, values = list(self.labels), list(self.labels.values())

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(values, value)
            return c

        yield gauge("vllm:num_requests_running", "Requests in model execution batches.",
                    s["num_running"])  # fmt: skip
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be processed.",
                    s["num_waiting"])  # fmt: skip
        usage = 1 - s["num_free_blocks"] / s["num_blocks"] if s["num_blocks"] else 0.0
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                    usage)  # fmt: skip
        yield gauge("tandem:kv_cache_free_blocks", "Free KV blocks.", s["num_free_blocks"])
        yield counter("vllm:prefix_cache_queries",
                      "Prefix cache queries, in terms of number of queried tokens.",
                      s["prefix_cache_queries"])  # fmt: skip
        yield counter("vllm:prefix_cache_hits",
                      "Prefix cache hits, in terms of number of cached tokens.",
                      s["prefix_cache_hits"])  # fmt: skip
        yield counter("vllm:num_preemptions", "Cumulative number of preemptions.",
                      s["num_preemptions"])  # fmt: skip
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine "
                                 "CacheConfig", labels=[*names, "block_size", "cache_dtype",
                                                        "num_gpu_blocks"])  # fmt: skip
        info.add_metric([*values, str(s["block_size"]), s["kv_cache_dtype"], str(s["num_blocks"])],
                        1.0)  # fmt: skip
        yield info
        spec = s.get("spec_decode")
        if spec is not None:  # vLLM's names, with speculative decoding on
            yield counter("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.",
                          spec["num_drafts"])  # fmt: skip
            yield counter("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.",
                          spec["num_draft_tokens"])  # fmt: skip
            yield counter("vllm:spec_decode_num_accepted_tokens",
                          "Number of accepted tokens.", spec["num_accepted_tokens"])  # fmt: skip
            per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                          "Accepted tokens per draft position.",
                                          labels=[*names, "position"])  # fmt: skip
            for pos, n in enumerate(spec["num_accepted_tokens_per_pos"]):
                per_pos.add_metric([*values, str(pos)], n)
            yield per_pos
            draft = spec.get("draft")
            if draft is not None:  # a draft model's cost on this worker
                yield counter("tandem:spec_decode_draft_catch_up_tokens", "Tokens the draft "
                              "model computed KV for before proposing (prompts recomputed "
                              "here above all).", draft["catch_up_tokens"])  # fmt: skip
                yield counter("tandem:spec_decode_draft_catch_up_seconds", "Time of the draft "
                              "model's catch-up passes.", draft["catch_up_seconds"])  # fmt: skip
                yield counter("tandem:spec_decode_draft_seconds", "Time of the draft model's "
                              "passes, catch-up included.", draft["seconds"])  # fmt: skip
        lora = s.get("lora")
        if lora is not None:  # vLLM's gauge (its value: when it was taken), and the cache
            info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                     labels=[*names, "max_lora", "running_lora_adapters",
                                             "waiting_lora_adapters"])  # fmt: skip
            info.add_metric([*values, str(lora["max_lora"]), ",".join(lora["running"]),
                             ",".join(lora["waiting"])], time.time())  # fmt: skip
            yield info
            yield counter("tandem:lora_loads", "LoRA adapters read again (evicted from memory, "
                          "then asked for).", lora["loads"])  # fmt: skip
            yield counter("tandem:lora_evictions", "LoRA adapters dropped from memory "
                          "(--max-cpu-loras).", lora["evictions"])  # fmt: skip
        yield counter("tandem:engine_steps", "Engine steps run.", s["num_steps"])
        yield counter("tandem:prefill_tokens", "Prompt tokens computed (rate: prefill "
                      "tokens/s; recomputed tokens after a preemption count too).",
                      s["num_prefill_tokens"])  # fmt: skip


def engine_stats(engine, num_waiting: int = 0) -> dict | None:
    """The figures EngineCollector reads, from an EngineCore (None before it loaded)."""
    if engine is None:
        return None
    return {
        "num_running": len(engine.scheduler.running),
        "num_waiting": num_waiting + len(engine.scheduler.waiting),
        "num_blocks": engine.runner.info.num_blocks,
        "num_free_blocks": engine.kv.num_free_blocks,
        "block_size": engine.config.cache.block_size,
        "kv_cache_dtype": engine.config.cache.cache_dtype,  # vLLM's names: auto, fp8, ...
        "prefix_cache_queries": engine.kv.prefix_queries,
        "prefix_cache_hits": engine.kv.prefix_hits,
        "num_preemptions": engine.scheduler.num_preemptions,
        "num_steps": engine.num_steps,
        "num_prefill_tokens": engine.num_prefill_tokens,
        "spec_decode": None
        if engine.spec is None
        else {
            "num_drafts": engine.spec.num_drafts,
            "num_draft_tokens": engine.spec.num_draft_tokens,
            "num_accepted_tokens": engine.spec.num_accepted_tokens,
            "num_accepted_tokens_per_pos": list(engine.spec.num_accepted_tokens_per_pos),
            "draft": engine.spec.draft_cost(),
        },
        "lora": lora_stats(engine),
    }


def lora_stats(engine) -> dict | None:
    lora = engine.runner.lora
    if lora is None:
        return None
    running = {r.lora_name for r in engine.scheduler.running if r.lora_name}
    waiting = {r.lora_name for r in engine.scheduler.waiting if r.lora_name}
    return {"max_lora": lora.config.max_loras, "running": sorted(running),
            "waiting": sorted(waiting - running), "loads": lora.num_loads,
            "evictions": lora.num_evictions}  # fmt: skip


class WorkerMetrics:
    """A worker's own histograms and counters (both roles), labelled with the worker."""

    def __init__(self, registry: CollectorRegistry, worker_id: str, role: str) -> None:
        labels = {"worker": worker_id, "role": role}
        names = list(labels)

        def child(metric):
            return metric.labels(**labels)

        r = registry
        self.step_seconds = child(Histogram(
            "tandem:engine_step_seconds", "Time of one engine step (forward and sampling).",
            names, buckets=FAST_BUCKETS, registry=r))  # fmt: skip
        self.batch_size = child(Histogram(
            "tandem:batch_size", "Requests in one engine step (the decode batch size on "
            "decode workers).", names, buckets=BATCH_BUCKETS, registry=r))  # fmt: skip
        self.kv_bytes_sent = child(Counter(
            "tandem:kv_transfer_sent_bytes", "KV bytes sent to decode workers.",
            names, registry=r))  # fmt: skip
        self.kv_bytes_received = child(Counter(
            "tandem:kv_transfer_received_bytes", "KV bytes received from prefill workers.",
            names, registry=r))  # fmt: skip
        self.core_loan_steps = child(Counter(
            "tandem:core_loan_steps", "Decode steps run with the prefill workers' idle cores "
            "lent (--core-loan).", names, registry=r))  # fmt: skip
        self.kv_transfer_seconds = child(Histogram(
            "tandem:kv_transfer_latency_seconds", "A hand-off from its probe to the decode "
            "worker's acknowledgement (KV chunks included).", names, buckets=FAST_BUCKETS,
            registry=r))  # fmt: skip
        self.kv_blocks_reused = child(Counter(
            "tandem:kv_transfer_reused_blocks", "Blocks a hand-off did not send: the decode "
            "worker held them already.", names, registry=r))  # fmt: skip
        compile_seconds = Histogram(
            "tandem:structured_output_compile_seconds", "Time a structured-output request "
            "waited for its grammar on this worker (compiled, or from the cache).",
            [*names, "cache_hit"], buckets=FAST_BUCKETS, registry=r)  # fmt: skip
        self.grammar_compile = {
            hit: compile_seconds.labels(**labels, cache_hit=str(hit).lower())
            for hit in (False, True)
        }
        self.grammar_mask_seconds = child(Histogram(
            "tandem:structured_output_mask_seconds", "Time of one step's grammar bitmasks "
            "(filled for the constrained rows, applied to the logits).", names,
            buckets=FAST_BUCKETS, registry=r))  # fmt: skip
        self.grammar_waiting = child(Gauge(
            "tandem:structured_output_waiting_requests", "Requests waiting for their grammar "
            "to compile (vLLM's WAITING_FOR_FSM).", names, registry=r))  # fmt: skip

    def observe_grammars(self, engine) -> None:
        """After a step: its bitmask time, and the requests waiting on a compile."""
        stats = engine.grammars.stats
        for seconds in stats.drain_mask_seconds():
            self.grammar_mask_seconds.observe(seconds)
        self.grammar_waiting.set(stats.num_waiting)

    def observe_compile(self, start_ns: int, end_ns: int, hit: bool) -> None:
        self.grammar_compile[hit].observe((end_ns - start_ns) / 1e9)


class SchedulerMetrics:
    """The central scheduler's queue: what a prefill autoscaler reads."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "tandem:scheduler_queue_depth", "Requests waiting at the scheduler.", registry=r
        )
        self.refused = Counter(
            "tandem:scheduler_refused_requests",
            "Requests refused with 503: the queue at its bound, or no worker to take them.",
            registry=r,
        )
        self.waiting_tokens = Gauge(
            "tandem:scheduler_waiting_tokens",
            "Prompt tokens waiting at the scheduler (queued prefill work).",
            registry=r,
        )
        self.prefilling = Gauge(
            "tandem:scheduler_prefilling", "Requests placed on a prefill worker.", registry=r
        )
        self.local_prefills = Counter(
            "tandem:scheduler_local_prefills",
            "Requests placed on a decode worker to prefill itself (--max-local-prefill-length).",
            registry=r,
        )
        self.workers = Gauge("tandem:workers", "Live workers, by role.", ["role"], registry=r)
        self.index_lookup = Histogram(
            "tandem:prefix_index_lookup_seconds",
            "One request's prefix-index lookup in Redis.",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.index_available = Gauge(
            "tandem:prefix_index_available", "1 while Redis answers.", registry=r
        )


class TokenizerMetrics:
    """The tokenizer stage's load: its calls and the stream it detokenizes."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.call_seconds = Histogram(
            "tandem:tokenizer_call_seconds",
            "One gRPC call to the tokenizer (tokenize, chat template, detokenize).",
            ["method"],
            buckets=FAST_BUCKETS,
            registry=registry,
        )
        self.detokenize_seconds = Histogram(
            "tandem:detokenize_batch_seconds",
            "Detokenizing and relaying one worker step's tokens.",
            buckets=FAST_BUCKETS,
            registry=registry,
        )
