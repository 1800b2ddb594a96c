"""The pure parts of `tandem bench serve`: statistics, arrivals, prompts, SSE, timings."""

import math

import pytest

from tandem.bench.deploy import format_cpus, short_name
from tandem.bench.load import (
    SSE_DONE,
    RequestResult,
    arrival_offsets,
    parse_sse_line,
    percentile,
    poisson_gaps,
    random_prompts,
    result_from_events,
    stats_ms,
    summarize,
)


def test_percentile_interpolates_linearly_and_is_zero_when_empty():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile(list(range(101)), 90) == pytest.approx(90.0)
    assert percentile([], 50) == 0.0


def test_stats_ms_converts_seconds_to_milliseconds():
    s = stats_ms([0.001, 0.002, 0.003])
    assert s["mean"] == pytest.approx(2.0)
    assert s["p50"] == pytest.approx(2.0)
    assert s["p99"] == pytest.approx(2.98)
    assert stats_ms([]) == {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}


def test_poisson_gaps_have_mean_one_over_rate_and_are_seeded():
    gaps = poisson_gaps(20000, 4.0, seed=1)
    assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.05)
    assert gaps == poisson_gaps(20000, 4.0, seed=1)
    assert gaps != poisson_gaps(20000, 4.0, seed=2)
    assert poisson_gaps(3, math.inf, seed=0) == [0.0, 0.0, 0.0]


def test_arrival_offsets_start_at_zero_and_accumulate():
    offsets = arrival_offsets(5, 2.0, seed=0)
    assert len(offsets) == 5 and offsets[0] == 0.0
    assert all(b >= a for a, b in zip(offsets, offsets[1:]))
    assert arrival_offsets(4, math.inf, seed=0) == [0.0] * 4
    assert arrival_offsets(1, 1.0, seed=0) == [0.0]


def test_random_prompts_are_distinct_in_range_and_seeded():
    prompts = random_prompts(50, 16, vocab_size=100, seed=3)
    assert len(prompts) == 50 and all(len(p) == 16 for p in prompts)
    assert len({tuple(p) for p in prompts}) == 50
    assert all(10 <= t < 90 for p in prompts for t in p)
    assert prompts == random_prompts(50, 16, vocab_size=100, seed=3)
    # Even when collisions are likely, the prompts come out distinct.
    short = random_prompts(30, 1, vocab_size=50, seed=0)
    assert len({tuple(p) for p in short}) == 30


def test_parse_sse_line():
    assert parse_sse_line('data: {"a": 1}') == {"a": 1}
    assert parse_sse_line('data:{"a":1}') == {"a": 1}
    assert parse_sse_line("data: [DONE]") == SSE_DONE
    assert parse_sse_line("") is None
    assert parse_sse_line(": keep-alive") is None
    with pytest.raises(ValueError):
        parse_sse_line("data: {not json")


def _chunk(text: str) -> dict:
    return {"choices": [{"index": 0, "text": text}]}


def _usage(n: int) -> dict:
    return {"choices": [], "usage": {"completion_tokens": n}}


def test_result_from_events_times_first_chunk_and_gaps():
    events = [(1.5, _chunk("a")), (1.7, _chunk("")), (2.0, _chunk("b")), (2.1, _usage(3))]
    r = result_from_events(1.0, events, 2.2, done=True, expected=3)
    assert r.ok and r.output_tokens == 3
    assert r.ttft == pytest.approx(0.5)
    assert r.itl == pytest.approx([0.2, 0.3])
    assert r.e2e == pytest.approx(1.2)


@pytest.mark.parametrize(
    "events, done, error",
    [
        ([(1.5, _chunk("a")), (2.0, _usage(1))], True, "1 output tokens, expected 2"),
        ([(1.5, _chunk("a"))], True, "None output tokens"),
        ([(1.5, _chunk("a")), (2.0, _usage(2))], False, "before [DONE]"),
        ([(1.5, {"error": {"message": "boom"}})], True, "boom"),
        ([(2.0, _usage(2))], True, "no content"),
    ],
)
def test_result_from_events_fails_short_or_broken_streams(events, done, error):
    r = result_from_events(1.0, events, 3.0, done=done, expected=2)
    assert not r.ok and error in r.error


def test_summarize_counts_throughput_and_latencies():
    results = [
        RequestResult(True, ttft=0.1, itl=[0.01, 0.03], e2e=0.14, output_tokens=3),
        RequestResult(True, ttft=0.3, itl=[0.02, 0.02], e2e=0.34, output_tokens=3),
        RequestResult(False, output_tokens=1, error="1 output tokens, expected 3"),
    ]
    f = summarize(results, duration_s=2.0)
    assert (f["completed"], f["failed"]) == (2, 1)
    assert f["request_throughput"] == pytest.approx(1.0)
    assert f["output_tok_s"] == pytest.approx(3.0)
    assert f["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert f["tpot_ms"]["mean"] == pytest.approx(20.0)  # (0.04 / 2) both
    assert f["itl_ms"]["p50"] == pytest.approx(20.0)
    assert f["e2e_ms"]["p50"] == pytest.approx(240.0)
    assert f["output_lens"] == [3, 3, 1]
    assert f["errors"] == ["1 output tokens, expected 3"]


def test_format_cpus_collapses_ranges():
    assert format_cpus({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert format_cpus({3}) == "3"


@pytest.mark.parametrize(
    "argv, comm, name",
    [
        (["/v/bin/python", "-m", "tandem.cli", "serve", "--port", "1"], "python", "serve"),
        (["/v/bin/tandem", "worker", "prefill", "--x"], "tandem", "worker prefill"),
        (["python3", "-m", "tandem.services.tokenizer.service"], "python3", "tokenizer"),
        (["/v/bin/nats-server", "-a", "127.0.0.1", "-m", "8222"], "nats-server", "nats-server"),
        (["redis-server 127.0.0.1:6379"], "redis-server", "redis-server"),
        (["python", "-c", "from multiprocessing.spawn import spawn_main"], "pt_main", "pt_main"),
        ([], "kworker", "kworker"),
    ],
)
def test_short_name_from_cmdline(argv, comm, name):
    assert short_name(argv, comm) == name


def test_soak_reads_the_memory_of_the_server_listening_on_a_port():
    import os
    import subprocess
    import sys
    import time

    from tandem.bench.soak import rss_mib, server_processes

    port = "47391"
    code = "import time; time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code, "--port", port])
    try:
        deadline = time.monotonic() + 10
        while not server_processes(f"http://127.0.0.1:{port}"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert server_processes(f"http://127.0.0.1:{port}") == [proc.pid]
        (rss,) = rss_mib([proc.pid]).values()
        assert 1 < rss < 1000
        assert rss_mib([os.getpid()])  # and any process by pid
    finally:
        proc.kill()
        proc.wait()
