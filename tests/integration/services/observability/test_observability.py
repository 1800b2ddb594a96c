"""Traces, metrics and logs of the real cluster: one trace per request across the five
stages (from the trace file every stage writes), /metrics counters that match known
traffic exactly, and one structured log line per finished request. The cluster runs with
conditional disaggregation as by default: prompts longer than LOCAL tokens go through the
prefill worker, shorter ones are prefilled by the decode worker (a trace of its own)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tandem.services.observability.tracing import read_spans, request_trace
from tests.helpers.cluster import start_cluster, stop_cluster

STAGES = {"gateway", "tokenizer", "scheduler", "prefill", "decode"}
LOCAL = 256  # --max-local-prefill-length's default
LONG = "The quick brown fox jumps over the lazy dog. " * 7  # > LOCAL tokens (bytes): handed off


@pytest.fixture(scope="module")
def traced(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("observability")
    trace_file, log_file = tmp / "spans.jsonl", tmp / "cluster.log"
    proc, base = start_cluster(
        tiny_llama,
        "--trace-file", str(trace_file), "--log-format", "json",
        "--cpu-kv-cache-space", "0.1", "--served-model-name", "tiny-llama",
        log_path=log_file,
    )  # fmt: skip
    yield base, trace_file, log_file
    stop_cluster(proc)


def _eventually(check, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _trace_of(trace_file, request_id: str, stages=STAGES) -> list[dict]:
    spans = request_trace(read_spans(trace_file), request_id)
    assert {s["service"] for s in spans} == stages, spans
    assert any(s["name"] == "POST /v1/completions" for s in spans)
    return spans


def test_one_trace_covers_every_stage_in_order(traced):
    base, trace_file, _ = traced
    body = {"prompt": LONG, "max_tokens": 8, "ignore_eos": True, "stream": True}
    request_id = None
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                request_id = json.loads(line[6:])["id"]
    assert request_id

    spans = _eventually(lambda: _trace_of(trace_file, request_id))
    by_name = {}
    for s in spans:
        by_name.setdefault(s["name"], []).append(s)
    assert {s["trace_id"] for s in spans} == {spans[0]["trace_id"]}
    (root,) = by_name["POST /v1/completions"]
    assert root["service"] == "gateway" and root["parent_id"] is None
    for s in spans:
        if s is not root:  # the stages' spans hang off the gateway's request span
            assert s["parent_id"] == root["span_id"], s
            assert root["start_ns"] <= s["start_ns"] <= s["end_ns"], s
            # The prefill worker ends its kv_transfer span when it reads the decode worker's
            # answer, which can come after the (tiny, fast) request has finished decoding.
            assert s["end_ns"] <= root["end_ns"] or s["name"] == "kv_transfer", s
    names = {"tokenize", "queue", "prefill", "kv_transfer", "decode", "detokenize"}
    assert names <= set(by_name)
    service = {name: by_name[name][0]["service"] for name in names}
    assert service == {
        "tokenize": "tokenizer",
        "queue": "scheduler",
        "prefill": "prefill",
        "kv_transfer": "prefill",
        "decode": "decode",
        "detokenize": "tokenizer",
    }
    (tok,), (queue,), (kv,), (decode,), (detok,) = (
        by_name[n] for n in ("tokenize", "queue", "kv_transfer", "decode", "detokenize")
    )
    prefills = sorted(by_name["prefill"], key=lambda s: s["start_ns"])
    assert tok["end_ns"] <= queue["start_ns"]
    assert queue["end_ns"] <= prefills[0]["start_ns"]
    assert prefills[-1]["end_ns"] <= kv["start_ns"] <= decode["start_ns"]
    assert prefills[-1]["end_ns"] <= detok["start_ns"]
    assert decode["end_ns"] <= root["end_ns"]
    # The one-way route: each stage entered once, in order, on the way in (a stage's
    # consecutive spans are one visit); the tokenizer again for the token stream back.
    visits = []
    for s in sorted(spans, key=lambda s: s["start_ns"]):
        if s["name"] != "detokenize" and (not visits or visits[-1] != s["service"]):
            visits.append(s["service"])
    assert visits == ["gateway", "tokenizer", "scheduler", "prefill", "decode"], [
        (s["service"], s["name"]) for s in sorted(spans, key=lambda s: s["start_ns"])
    ]
    assert len(by_name["detokenize"]) == 1
    assert len(by_name["tokenize"]) == 1 and len(by_name["queue"]) == 1

    attrs = root["attributes"]
    assert attrs["gen_ai.request.id"] == request_id
    assert attrs["gen_ai.usage.completion_tokens"] == 8
    assert attrs["gen_ai.usage.prompt_tokens"] > 0
    assert 0 < attrs["gen_ai.latency.time_to_first_token"] <= attrs["gen_ai.latency.e2e"]
    assert queue["attributes"]["gen_ai.latency.time_in_queue"] >= 0
    assert (
        sum(p["attributes"]["tandem.num_tokens"] for p in prefills)
        == (attrs["gen_ai.usage.prompt_tokens"])
    )
    assert decode["attributes"]["gen_ai.usage.completion_tokens"] == 8
    assert detok["attributes"]["gen_ai.usage.completion_tokens"] == 8

    out = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "trace", request_id, "--trace-file", str(trace_file)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert root["trace_id"] in out
    for name in names:
        assert name in out
    for stage in STAGES:
        assert stage in out


def test_a_short_prompt_prefilled_by_its_decode_worker_has_its_prefill_span_there(traced):
    base, trace_file, _ = traced
    body = {"prompt": "The quick brown fox", "max_tokens": 5, "ignore_eos": True}
    r = httpx.post(base + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    request_id = r.json()["id"]
    stages = STAGES - {"prefill"}
    spans = _eventually(lambda: _trace_of(trace_file, request_id, stages))
    by_name = {}
    for s in sorted(spans, key=lambda s: s["start_ns"]):
        by_name.setdefault(s["name"], []).append(s)
    assert "kv_transfer" not in by_name
    (queue,), (prefill,), (decode,) = by_name["queue"], by_name["prefill"], by_name["decode"]
    assert queue["attributes"]["tandem.prefill_worker"] == ""
    assert prefill["service"] == decode["service"] == "decode"
    assert prefill["attributes"]["tandem.local_prefill"] is True
    assert prefill["attributes"]["tandem.num_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert queue["end_ns"] <= decode["start_ns"] <= prefill["start_ns"] <= prefill["end_ns"]
    assert prefill["end_ns"] <= decode["end_ns"]
    assert decode["attributes"]["gen_ai.usage.completion_tokens"] == 5


def test_a_grammar_compile_is_a_span_on_each_worker_and_in_the_metrics(traced):
    base, trace_file, _ = traced
    before = _settled(base)
    ids = []
    for i in range(2):  # compiled, then from each worker's cache
        body = {
            "prompt": f"{i} {LONG}",  # no prefix in common: handed off both times
            "max_tokens": 12,
            "structured_outputs": {"regex": "[a-z]{6}"},
        }
        r = httpx.post(base + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert re.fullmatch("[a-z]{6}", r.json()["choices"][0]["text"])
        ids.append(r.json()["id"])

    for request_id, hit in zip(ids, (False, True)):
        spans = _eventually(lambda rid=request_id: _trace_of(trace_file, rid))
        compiles = [s for s in spans if s["name"] == "structured_output.compile"]
        assert {s["service"] for s in compiles} == {"prefill", "decode"}, compiles
        assert all(s["attributes"]["tandem.grammar.cache_hit"] is hit for s in compiles)

    def check():
        after = _scrape(base)
        for role in ("prefill", "decode"):
            for hit, count in (("false", 1), ("true", 1)):
                name = "tandem:structured_output_compile_seconds_count"
                got = _total(after, name, role=role, cache_hit=hit)
                got -= _total(before, name, role=role, cache_hit=hit)
                assert got == count, (role, hit, got)
        masks = _total(after, "tandem:structured_output_mask_seconds_count", role="decode")
        assert masks - _total(before, "tandem:structured_output_mask_seconds_count") > 0
        assert _total(after, "tandem:structured_output_waiting_requests") == 0

    _eventually(check)


def _scrape(base: str) -> dict:
    """{(sample name, frozenset of labels without model_name): value}, checking that every
    sample carries the model's name."""
    text = httpx.get(base + "/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert s.labels.get("model_name") == "tiny-llama", s
            labels = frozenset((k, v) for k, v in s.labels.items() if k != "model_name")
            samples[(s.name, labels)] = s.value
    return samples


def _total(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def test_metrics_count_known_traffic_exactly(traced):
    base = traced[0]
    _eventually(lambda: _assert_idle(_scrape(base)))
    before = _settled(base)
    rng = random.Random(7)
    lengths, max_tokens = [LOCAL + 5, LOCAL + 17, LOCAL + 33], 6
    for n in lengths:
        prompt = [rng.randrange(3, 250) for _ in range(n)]
        body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
        r = httpx.post(base + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
    num, gen = len(lengths), len(lengths) * max_tokens
    expected = {
        ("vllm:prompt_tokens_total", ()): sum(lengths),
        ("vllm:generation_tokens_total", ()): gen,
        ("vllm:request_success_total", (("finished_reason", "length"),)): num,
        ("vllm:time_to_first_token_seconds_count", ()): num,
        ("vllm:e2e_request_latency_seconds_count", ()): num,
        ("vllm:inter_token_latency_seconds_count", ()): gen - num,
        ("vllm:request_prompt_tokens_sum", ()): sum(lengths),
        ("vllm:request_generation_tokens_count", ()): num,
        ("tandem:requests_received_total", ()): num,
        ("tandem:token_stream_lag_seconds_count", ()): None,  # > 0: checked below
        # pushed by the other stages, a second or so later
        ("vllm:request_queue_time_seconds_count", ()): num,
        ("tandem:prefill_tokens_total", (("role", "prefill"),)): sum(lengths),
        ("tandem:batch_size_count", (("role", "prefill"),)): None,
    }

    def check():
        after = _scrape(base)
        for (name, labels), want in expected.items():
            got = _total(after, name, **dict(labels)) - _total(before, name, **dict(labels))
            if want is None:
                assert got > 0, name
            else:
                assert got == want, (name, got, want)
        sent = _total(after, "tandem:kv_transfer_sent_bytes_total")
        received = _total(after, "tandem:kv_transfer_received_bytes_total")
        assert sent == received > _total(before, "tandem:kv_transfer_sent_bytes_total")
        _assert_idle(after)
        return after

    after = _eventually(check)
    # vLLM's per-worker families are there for each worker, with its role.
    for role in ("prefill", "decode"):
        for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
            assert any(n == name and ("role", role) in ls for n, ls in after), (name, role)
        for name in ("vllm:prefix_cache_queries_total", "vllm:num_preemptions_total"):
            assert any(n == name and ("role", role) in ls for n, ls in after), (name, role)
    assert _total(after, "tandem:workers", role="prefill") == 1
    kv = httpx.get(base + "/stats", timeout=10).json()["kv_transfer"]  # from the heartbeats
    assert kv["num_transfers"] >= num and kv["mean_ms"] > 0 and kv["bytes"] > 0
    assert _total(after, "tandem:scheduler_queue_depth") == 0


def _settled(base: str) -> dict:
    """A scrape once the stages' pushes (every PUSH_INTERVAL) bring nothing new: counts of
    earlier requests that reach the gateway late must not fall into the next test's delta."""
    from tandem.services.observability.metrics_push import PUSH_INTERVAL

    samples = _scrape(base)
    for _ in range(20):
        time.sleep(2 * PUSH_INTERVAL)
        again = _scrape(base)
        if again == samples:
            return again
        samples = again
    return samples


def _assert_idle(samples: dict) -> None:
    assert _total(samples, "vllm:num_requests_running") == 0
    assert _total(samples, "tandem:requests_in_flight") == 0
    assert _total(samples, "vllm:kv_cache_usage_perc", role="decode") == 0


def test_one_json_log_line_per_finished_request(traced):
    base, _, log_file = traced
    r = httpx.post(
        base + "/v1/completions",
        json={"prompt": [11, 12, 13], "max_tokens": 4, "ignore_eos": True},
        timeout=60,
    )
    request_id = r.json()["id"]

    def line():
        for raw in log_file.read_text().splitlines():
            if raw.startswith("{") and f'"{request_id}-0"' in raw:
                return json.loads(raw)
        raise AssertionError("no log line yet")

    entry = _eventually(line)
    assert entry["stage"] == "gateway"
    assert entry["request_id"] == f"{request_id}-0"
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (3, 4)
    assert entry["finish_reason"] == "length"
    assert len(entry["trace_id"]) == 32
    assert 0 < entry["ttft_ms"] <= entry["e2e_ms"]


def test_a_decode_worker_borrows_the_idle_prefill_core(traced):
    """Pinned workers (`tandem serve`'s default with as many cores as workers): decode steps
    run while the prefill worker idles use its core too, and the metric counts them."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: the workers share it, nothing is lent")
    base = traced[0]
    before = _total(_scrape(base), "tandem:core_loan_steps_total", role="decode")
    # long enough that the prefill worker has been idle for the loan's settling time
    body = {"prompt": [5, 6, 7], "max_tokens": 400, "ignore_eos": True}
    r = httpx.post(base + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text

    def lent():
        got = _total(_scrape(base), "tandem:core_loan_steps_total", role="decode")
        assert got > before, (got, before)

    _eventually(lent)
