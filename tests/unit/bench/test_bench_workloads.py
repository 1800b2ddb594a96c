"""The pure parts of `tandem bench serve`'s workloads: interference, goodput, sampling,
tracing and soak."""

import argparse

import pytest

from tandem.bench.goodput import (
    CANCELLED,
    Slo,
    clip_lens,
    goodput,
    parse_rates,
    rate_figures,
    sample_requests,
    stop_sweep,
)
from tandem.bench.goodput import report as goodput_report
from tandem.bench.interference import (
    find_key,
    first_output_lens,
    gaps_within,
    kv_transfer_share,
    phase_figures,
    step_rates,
)
from tandem.bench.load import RequestResult, ServerInfo, arrivals_within, tpot

# -- interference ----------------------------------------------------------------------------


def test_gaps_within_keeps_only_gaps_with_both_tokens_inside_the_phase():
    streams = [[0.0, 1.0, 2.0, 3.0], [1.5, 2.5], [5.0, 6.0]]
    assert gaps_within(streams, 1.0, 3.0) == [1.0, 1.0, 1.0]  # 1-2, 2-3, 1.5-2.5
    # A gap straddling a boundary belongs to neither phase.
    assert gaps_within(streams, 0.0, 2.6) == [1.0, 1.0, 1.0]
    assert gaps_within(streams, 2.6, 10.0) == [1.0]
    assert gaps_within([[0.5]], 0.0, 1.0) == []


def test_phase_figures_count_tokens_and_gaps_in_ms():
    f = phase_figures([[0.0, 0.1, 0.2, 0.4], [0.15, 0.35]], 0.0, 0.5)
    assert f["num_gaps"] == 4
    assert f["decode_tok_s"] == pytest.approx(6 / 0.5)
    assert f["itl_ms"]["p50"] == pytest.approx(150.0)
    assert f["itl_ms"]["max"] == pytest.approx(200.0)
    empty = phase_figures([], 1.0, 1.0)
    assert empty["num_gaps"] == 0 and empty["decode_tok_s"] == 0.0


def test_first_output_lens_stagger_up_to_the_full_length():
    assert first_output_lens(4, 512) == [128, 256, 384, 512]
    assert first_output_lens(3, 2) == [1, 1, 2]
    assert first_output_lens(1, 7) == [7]


def test_step_rates_per_worker_between_two_stats_snapshots():
    before = {"workers": {"d0": {"role": "decode", "num_steps": 100}, "gone": {"num_steps": 1}}}
    after = {"workers": {"d0": {"role": "decode", "num_steps": 150}, "new": {"num_steps": 9}}}
    assert step_rates(before, after, 5.0) == {"d0": {"role": "decode", "steps_per_s": 10.0}}
    assert step_rates(before, after, 0.0) == {}
    assert step_rates({}, after, 5.0) == {}


def test_kv_transfer_share_reads_the_stats_entry_or_is_none():
    stats = {"workers": {"p0": {"role": "prefill", "kv_transfer": {"mean_ms": 50.0}}}}
    assert find_key(stats, "kv_transfer") == {"mean_ms": 50.0}
    assert kv_transfer_share(find_key(stats, "kv_transfer"), 200.0) == pytest.approx(0.25)
    assert kv_transfer_share({"share_of_ttft": 0.1, "mean_ms": 5.0}, 200.0) == 0.1
    assert find_key({"workers": {"engine": {"num_running": 0}}}, "kv_transfer") is None
    assert kv_transfer_share(None, 200.0) is None
    assert kv_transfer_share({"mean_ms": 50.0}, 0.0) is None
    assert kv_transfer_share(3.0, 200.0) is None


# -- goodput ---------------------------------------------------------------------------------


def _ok(ttft: float, e2e: float, tokens: int) -> RequestResult:
    return RequestResult(True, ttft=ttft, e2e=e2e, output_tokens=tokens)


def test_slo_needs_both_ttft_and_mean_gap_within_bounds():
    slo = Slo(ttft_s=1.0, itl_s=0.1)
    assert slo.met_by(_ok(1.0, 1.0 + 9 * 0.1, 10))  # both exactly at the bound
    assert not slo.met_by(_ok(1.01, 1.5, 10))  # TTFT over
    assert not slo.met_by(_ok(0.5, 0.5 + 9 * 0.11, 10))  # mean gap over
    assert slo.met_by(_ok(0.5, 0.5, 1))  # one token: no gap
    assert not slo.met_by(RequestResult(False, error="boom"))
    assert tpot(_ok(0.5, 1.4, 10)) == pytest.approx(0.1)
    assert slo.deadline(10) == pytest.approx(1.9)
    with pytest.raises(ValueError):
        Slo(0.0, 0.1)


def test_rate_figures_count_failures_as_misses():
    slo = Slo(1.0, 0.1)
    results = [
        _ok(0.2, 1.0, 10),  # meets
        _ok(2.0, 2.5, 10),  # TTFT too long
        RequestResult(False, error=CANCELLED),
        RequestResult(False, error="HTTP 500: x"),
    ]
    row = rate_figures(0.5, results, slo)
    assert (row["sent"], row["completed"], row["failed"], row["cancelled"]) == (4, 2, 2, 1)
    assert row["met_slo"] == 1 and row["attainment"] == pytest.approx(0.25)
    assert row["ttft_ms"]["p50"] == pytest.approx(1100.0)
    assert rate_figures(1.0, [], slo)["attainment"] == 0.0


def test_goodput_is_the_highest_rate_reaching_the_target():
    assert goodput({0.25: 1.0, 0.5: 0.95, 1.0: 0.89, 2.0: 0.3}) == 0.5
    assert goodput({0.25: 0.92, 0.5: 0.85, 1.0: 0.9}) == 1.0  # a noisy dip does not cap it
    assert goodput({0.25: 0.5}) == 0.0
    assert goodput({}) == 0.0


def test_sweep_stops_after_two_rates_in_a_row_below_half():
    assert not stop_sweep([])
    assert not stop_sweep([0.4])
    assert not stop_sweep([0.4, 0.6])
    assert not stop_sweep([0.4, 0.6, 0.3])
    assert stop_sweep([1.0, 0.4, 0.3])


def test_parse_rates_sorts_and_rejects_non_positive():
    assert parse_rates("1, 0.25,0.5,1") == [0.25, 0.5, 1.0]
    for bad in ("", "0,1", "-1"):
        with pytest.raises(ValueError):
            parse_rates(bad)


def test_clip_lens_keeps_prompt_plus_output_under_the_context():
    assert clip_lens(100, 50, 0) == (100, 50)
    assert clip_lens(100, 50, 151) == (100, 50)
    assert clip_lens(100, 50, 150) == (100, 49)
    assert clip_lens(300, 50, 150) == (148, 1)


def test_arrivals_within_stay_in_the_window_and_are_seeded():
    offsets = arrivals_within(1000.0, 2.0, seed="a")
    assert offsets[0] == 0.0 and all(0 <= t < 1000.0 for t in offsets)
    assert len(offsets) == pytest.approx(2000, rel=0.1)
    assert offsets == arrivals_within(1000.0, 2.0, seed="a")
    assert offsets != arrivals_within(1000.0, 2.0, seed="b")


def test_sample_requests_lengths_in_range_seeded_and_distinct_per_rate():
    info = ServerInfo(max_model_len=0, vocab_size=1000)
    reqs = sample_requests(2.0, 50.0, (8, 16, 2, 4), info, seed=0)
    assert len(reqs) > 50
    assert all(8 <= len(r.prompt) <= 16 and 2 <= r.output_len <= 4 for r in reqs)
    assert all(10 <= t < 990 for r in reqs for t in r.prompt)
    assert {len(r.prompt) for r in reqs} == set(range(8, 17))  # uniform over the range
    assert reqs == sample_requests(2.0, 50.0, (8, 16, 2, 4), info, seed=0)
    # Another rate gets other prompts: the server's prefix cache cannot carry over.
    other = sample_requests(1.0, 50.0, (8, 16, 2, 4), info, seed=0)
    assert not {tuple(r.prompt) for r in reqs} & {tuple(r.prompt) for r in other}
    clipped = sample_requests(2.0, 10.0, (100, 200, 50, 60), ServerInfo(120, 1000), seed=1)
    assert all(len(r.prompt) + r.output_len < 120 and r.output_len >= 1 for r in clipped)
    with pytest.raises(ValueError):
        sample_requests(1.0, 1.0, (16, 8, 1, 2), info, seed=0)


def test_goodput_report_tables_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rows = [{"rate": 0.5, "attainment": 1.0, "failed": 0, "cancelled": 0},
            {"rate": 1.0, "attainment": 0.4, "failed": 2, "cancelled": 2}]  # fmt: skip
    runs = {
        "disaggregated": {"goodput": 0.5, "rates": rows, "skipped_rates": []},
        "colocated": {"goodput": 0.0, "rates": rows[1:], "skipped_rates": [2.0]},
    }
    args = argparse.Namespace(
        rates="0.5,1", duration_s=3.0, ttft_slo_ms=3000.0, itl_slo_ms=150.0, min_input_len=1,
        max_input_len=2, min_output_len=1, max_output_len=2, seed=0, plot=None,
        json=str(tmp_path / "g.json"),
    )  # fmt: skip
    result, ok = goodput_report(runs, args)
    assert ok
    assert (result["goodput_disagg"], result["goodput_colocated"]) == (0.5, 0.0)
    assert result["attainment"]["colocated"] == {"1": 0.4}
    assert result["plot"] == str(tmp_path / "g.png")
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "skipped" in printed and "goodput (req/s)" in printed


def test_sampling_and_tracing_reports(tmp_path, capsys, monkeypatch):
    from tandem.bench import sampling_cost, tracing_cost

    def fig(tok_s, failed=0):
        return {"output_tok_s": tok_s, "completed": 10, "failed": failed}

    args = argparse.Namespace(num_prompts=8, input_len=16, output_len=16, max_concurrency=4,
                              rounds=3)  # fmt: skip
    runs = {"disaggregated": {"greedy": [fig(100), fig(110), fig(90)],
                              "penalized": [fig(95), fig(99), fig(80)],
                              "url": "http://x", "placement": [{"pid": 1}]}}  # fmt: skip
    result, ok = sampling_cost.report(runs, args)
    assert ok and result["ratio"] == 95 / 100
    runs["disaggregated"]["penalized"][0]["failed"] = 1
    assert not sampling_cost.report(runs, args)[1]

    monkeypatch.setattr(tracing_cost, "TRACE_FILE", str(tmp_path / "none.jsonl"))
    runs = {"tracing-off": [fig(100), fig(120), fig(110)],
            "tracing-on": [fig(105), fig(100), fig(95)]}  # fmt: skip
    result, ok = tracing_cost.report(runs, args)
    assert result["ratio"] == 100 / 110
    assert not ok  # no traces were written for the traced requests
    assert "ratio on / off" in capsys.readouterr().out


# -- soak ------------------------------------------------------------------------------------


def test_settle_mark_is_five_minutes_or_a_fifth_of_a_shorter_run():
    from tandem.bench.soak import settle_mark_s

    assert settle_mark_s(1800) == 300
    assert settle_mark_s(1500) == 300
    assert settle_mark_s(300) == 60
    assert settle_mark_s(1800, settle_s=120) == 120
    assert settle_mark_s(60, settle_s=0) == 0


def test_memory_report_compares_the_end_with_the_first_sample_past_the_mark():
    from tandem.bench.soak import memory_report

    samples = [
        (0.0, {"prefill (1)": 3000.0, "decode (2)": 3000.0, "gone (3)": 50.0}),
        (15.0, {"prefill (1)": 3100.0, "decode (2)": 3010.0, "gone (3)": 50.0}),
        (30.0, {"prefill (1)": 3200.0, "decode (2)": 3020.0}),
        (45.0, {"prefill (1)": 3264.0, "decode (2)": 3020.0, "new (4)": 10.0}),
    ]
    r = memory_report(samples, mark_s=20.0, max_growth_pct=5.0)
    assert r["rss_mark_s"] == 30.0  # the first sample at or after 20 s
    assert r["rss_mib_mark"] == {"prefill (1)": 3200.0, "decode (2)": 3020.0}
    assert r["rss_growth_pct_after_mark"] == {"prefill (1)": 2.0, "decode (2)": 0.0}
    assert r["rss_growth_pct_start_to_end"] == {
        "prefill (1)": pytest.approx(8.8),
        "decode (2)": pytest.approx(20 / 30),
    }
    assert r["rss_worst"] == {"process": "prefill (1)", "growth_pct": 2.0}
    assert r["rss_within_bound"]
    assert not memory_report(samples, mark_s=20.0, max_growth_pct=1.5)["rss_within_bound"]
    # a mark past the last sample falls on it: no growth after it
    late = memory_report(samples, mark_s=999.0, max_growth_pct=5.0)
    assert late["rss_mark_s"] == 45.0 and late["rss_worst"]["growth_pct"] == 0.0
    assert memory_report([(0.0, {})], 0.0, 5.0)["rss_worst"] is None
    # a small process's few MiB are not what the bound is about
    small = [(0.0, {"redis (5)": 7.0, "decode (2)": 3000.0}),
             (30.0, {"redis (5)": 7.7, "decode (2)": 3010.0})]  # fmt: skip
    r = memory_report(small, mark_s=0.0, max_growth_pct=5.0)
    assert r["rss_growth_pct_after_mark"]["redis (5)"] == pytest.approx(10.0)
    assert r["rss_within_bound"] and r["rss_worst"]["process"] == "decode (2)"


def test_soak_report_fails_on_memory_growth_past_the_bound():
    from tandem.bench.soak import report

    args = argparse.Namespace(duration_s=60.0, max_concurrency=4, input_len=16, output_len=16,
                              disconnect_prob=0.3, settle_s=None,
                              max_rss_growth_pct=5.0)  # fmt: skip
    run = {"failed": 0, "leaked_blocks": 0, "idle_after": True, "rss_within_bound": True,
           "rss_worst": {"process": "prefill (1)", "growth_pct": 1.0}}  # fmt: skip
    result, ok = report({"disaggregated": run}, args)
    assert ok and result["rss_worst"] == {"disaggregated": run["rss_worst"]}
    assert result["workload"]["max_rss_growth_pct"] == 5.0
    assert not report({"disaggregated": run | {"rss_within_bound": False}}, args)[1]
