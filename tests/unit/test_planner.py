"""`tandem plan`: the simulators against queueing theory, and the recommendation against
independent simulation runs."""

import argparse
import dataclasses
import json
import math
import random
import re
import statistics

import pytest

from tandem.planner import (
    LengthDist,
    Profile,
    Slo,
    Workload,
    add_plan_parser,
    fit_line,
    make_workload,
    measured,
    parse_length_dist,
    recommend,
    simulate_decode,
    simulate_prefill,
)

DECODE_TABLE = {
    256: {1: 0.020, 8: 0.028, 32: 0.050, 64: 0.080},
    1024: {1: 0.024, 8: 0.036, 32: 0.075, 64: 0.125},
}


def make_profile(**overrides) -> Profile:
    """A worker about as fast as a small model on a GPU slice: 1,981 prompt tok/s at full steps."""
    fields = dict(
        prefill_a_s=0.01,
        prefill_b_s=0.0005,
        max_num_batched_tokens=2048,
        decode_step_s=DECODE_TABLE,
        block_size=16,
        num_blocks=4096,
        max_num_seqs=64,
        max_model_len=8192,
        kv_bytes_per_token=46080,
    )
    return Profile(**(fields | overrides))


def profile_json(profile: Profile) -> dict:
    """The profile in `tandem bench profile`'s format."""
    return dict(
        version=1,
        model="synthetic",
        machine=dict(device="cpu", dtype="float32", torch_threads=2, cpus="0-1"),
        capacity=dict(
            num_blocks=profile.num_blocks,
            block_size=profile.block_size,
            max_num_seqs=profile.max_num_seqs,
            max_model_len=profile.max_model_len,
            max_num_batched_tokens=profile.max_num_batched_tokens,
            kv_bytes_per_token=profile.kv_bytes_per_token,
        ),
        prefill=dict(fit=dict(a_s=profile.prefill_a_s, b_s_per_token=profile.prefill_b_s)),
        decode=dict(
            step_s={
                str(c): {str(b): s for b, s in t.items()} for c, t in profile.decode_step_s.items()
            }
        ),
    )


def workload(rate, prompt_len, output_len, num_requests, seed) -> Workload:
    return make_workload(
        rate, parse_length_dist(prompt_len), parse_length_dist(output_len), num_requests, seed
    )


# -- the profile -------------------------------------------------------------------------------


def test_fit_line_recovers_a_line_and_keeps_the_intercept_non_negative():
    xs = [128, 256, 512, 1024, 2048]
    a, b = fit_line(xs, [0.01 + 0.001 * x for x in xs])
    assert a == pytest.approx(0.01) and b == pytest.approx(0.001)
    a, b = fit_line([100, 200], [0.05, 0.2])  # a line through them would cross below zero
    assert a == 0.0 and b > 0


def test_decode_step_interpolates_in_batch_and_context():
    profile = make_profile(
        decode_step_s={256: {1: 0.02, 8: 0.034}, 1024: {1: 0.03, 8: 0.044}}, max_num_seqs=64
    )
    assert profile.decode_step(4, 256) == pytest.approx(0.026)
    assert profile.decode_step(16, 256) == pytest.approx(0.05)  # past the last point: its line
    assert profile.decode_step(100, 256) == pytest.approx(0.02 + 0.002 * 99)  # past max_num_seqs
    assert profile.decode_step(1, 640) == pytest.approx(0.025)
    assert profile.decode_step(1, 4096) == pytest.approx(0.03)  # nearest measured context
    assert profile.decode_step(1, 16) == pytest.approx(0.02)


def test_profile_reads_the_bench_profile_json():
    profile = make_profile()
    loaded = Profile.from_json(json.loads(json.dumps(profile_json(profile))))
    assert loaded.machine["device"] == "cpu"
    assert dataclasses.replace(loaded, machine={}) == profile


# -- the load ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, mean",
    [("128", 128), (" 64 ", 64), ("uniform:100:300", 200), ("normal:500:50", 500)],
)
def test_length_distributions_parse_and_sample(text, mean):
    dist = parse_length_dist(text)
    assert isinstance(dist, LengthDist)
    rng = random.Random(0)
    samples = [dist.sample(rng) for _ in range(4000)]
    assert all(isinstance(s, int) and s >= 1 for s in samples)
    assert statistics.fmean(samples) == pytest.approx(mean, rel=0.02)
    assert parse_length_dist(str(dist)) == dist


def test_normal_lengths_are_clipped_to_one():
    rng = random.Random(0)
    assert min(parse_length_dist("normal:2:50").sample(rng) for _ in range(1000)) == 1


@pytest.mark.parametrize(
    "text",
    ["0", "-5", "1.5", "", "abc", "uniform:5:1", "uniform:0:4", "uniform:1", "normal:100:-1",
     "normal:0:3", "pareto:1:2", "uniform:a:b", "normal:nan:1"],
)  # fmt: skip
def test_bad_length_distributions_raise_naming_the_value(text):
    with pytest.raises(ValueError, match=re.escape(repr(text.strip()))):
        parse_length_dist(text.strip())


# -- the simulators ----------------------------------------------------------------------------


def test_prefill_chunks_long_prompts_and_packs_short_ones():
    profile = make_profile()
    a, b = profile.prefill_a_s, profile.prefill_b_s
    # alone, 5,000 tokens under a 2,048 budget: three steps
    long = Workload(1.0, [0.0], [5000], [1])
    assert simulate_prefill(long, 1, profile).ttft_s == [pytest.approx(3 * a + 5000 * b)]
    # the first starts a step at once; the two that arrive during it share the next one
    short = Workload(1.0, [0.0, 0.001, 0.002], [100, 200, 300], [1, 1, 1])
    first = a + 100 * b
    ttft = simulate_prefill(short, 1, profile).ttft_s
    assert ttft == pytest.approx([first, first + a + 500 * b - 0.001, first + a + 500 * b - 0.002])


def test_prefill_spreads_requests_over_workers_by_queued_tokens():
    profile = make_profile()
    burst = Workload(1.0, [0.0, 0.0, 0.0], [2048, 2048, 100], [1, 1, 1])
    ttft = simulate_prefill(burst, 2, profile).ttft_s
    full = profile.prefill_step(2048)
    # 1 -> worker 0, 2 -> worker 1, 3 -> either (tied): behind one full step, not two
    assert ttft == pytest.approx([full, full, full + profile.prefill_step(100)])


@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_prefill_queueing_matches_md1(rho):
    """One worker, every prompt one full step (service time D): the mean wait is M/D/1's
    Wq = rho * D / (2 * (1 - rho))."""
    profile = make_profile()
    service = profile.prefill_step(2048)
    num = 200_000
    load = workload(rho / service, "2048", "1", num, seed=0)
    sim = simulate_prefill(load, 1, profile)
    wait = statistics.fmean(sim.ttft_s[r] - service for r in measured(num))
    assert wait == pytest.approx(rho * service / (2 * (1 - rho)), rel=0.04)
    assert sim.busy_frac == pytest.approx(rho, rel=0.02)


def test_decode_itl_at_low_load_is_the_batch1_step_and_grows_with_rate():
    profile = make_profile(decode_step_s={256: {1: 0.02, 8: 0.034, 64: 0.16}})
    quiet = simulate_decode(workload(0.05, "100", "16", 400, seed=1), 1, profile)
    assert quiet.percentile(50) == pytest.approx(0.02)
    assert quiet.percentile(90) == pytest.approx(0.02)
    assert quiet.mean_batch == pytest.approx(1.0, abs=0.05)
    p90 = [
        simulate_decode(workload(rate, "100", "16", 3000, seed=1), 1, profile).percentile(90)
        for rate in (2, 8, 16)
    ]
    assert 0.02 < p90[0] < p90[1] < p90[2]


def test_decode_requests_that_do_not_fit_wait_and_the_wait_counts_as_itl():
    load = workload(4.0, "100", "16", 2000, seed=2)
    ample = simulate_decode(load, 1, make_profile())
    # room for two requests' KV (8 blocks of 16 tokens each for 116 tokens)
    tight = simulate_decode(load, 1, make_profile(num_blocks=16))
    assert tight.mean_batch <= 2.0
    assert tight.percentile(99) > 2 * ample.percentile(99)
    capped = simulate_decode(load, 1, make_profile(max_num_seqs=2))
    assert capped.mean_batch <= 2.0 and capped.percentile(99) > 2 * ample.percentile(99)


def test_decode_rejects_requests_no_worker_can_hold():
    with pytest.raises(ValueError, match="max_model_len"):
        simulate_decode(workload(1.0, "8000", "500", 10, 0), 1, make_profile())


# -- the recommendation ------------------------------------------------------------------------

CASES = {
    # rate, prompt, output, TTFT SLO (s), ITL SLO (s): expected (prefill, decode) counts
    "long-prompts": (2.0, "uniform:512:1536", "uniform:64:256", 2.0, 0.05, (2, 2)),
    "normal-prompts": (4.0, "normal:800:300", "uniform:32:128", 1.5, 0.04, (3, 2)),
    "prefill-heavy": (4.0, "uniform:1024:3072", "128", 4.0, 0.055, (5, 2)),
    "decode-heavy": (16.0, "256", "normal:96:32", 0.5, 0.042, (3, 4)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_recommendation_holds_on_an_independent_run(case):
    rate, prompt, output, ttft_slo, itl_slo, expected = CASES[case]
    profile = make_profile()
    plan = recommend(profile, workload(rate, prompt, output, 3000, seed=0), Slo(ttft_slo, itl_slo))
    assert plan.feasible
    n_prefill, n_decode = plan.prefill.num_replicas, plan.decode.num_replicas
    assert (n_prefill, n_decode) == expected
    assert plan.prefill.lower_bound <= n_prefill and plan.decode.lower_bound <= n_decode
    assert plan.prefill.simulated[n_prefill]["latency_s"] <= ttft_slo
    assert plan.prefill.simulated[n_prefill - 1]["latency_s"] > ttft_slo

    check = workload(rate, prompt, output, 6000, seed=7)
    assert simulate_prefill(check, n_prefill, profile).percentile(90) <= ttft_slo
    assert simulate_prefill(check, n_prefill - 1, profile).percentile(90) > ttft_slo
    assert simulate_decode(check, n_decode, profile).percentile(90) <= itl_slo
    assert simulate_decode(check, n_decode - 1, profile).percentile(90) > itl_slo


def test_kv_transfer_adds_to_ttft():
    profile = make_profile()
    load = workload(1.0, "1000", "8", 1000, seed=0)
    plain = recommend(profile, load, Slo(5.0, 0.1))
    slow_link = recommend(profile, load, Slo(5.0, 0.1), kv_transfer_gbps=1.0)
    transfer = 1000 * profile.kv_bytes_per_token * 8 / 1e9  # 0.37 s
    p_plain = plain.prefill.simulated[plain.prefill.num_replicas]["latency_s"]
    p_slow = slow_link.prefill.simulated[plain.prefill.num_replicas]["latency_s"]
    assert p_slow == pytest.approx(p_plain + transfer, rel=0.05)


@pytest.mark.parametrize(
    "rate, prompt, output, slo, pool, reason",
    [
        (1.0, "2048", "16", Slo(0.5, 0.1), "prefill", "even alone"),
        (1.0, "512", "16", Slo(5.0, 0.01), "decode", "batch 1"),
        (1.0, "8000", "500", Slo(30.0, 0.1), "decode", "max_model_len"),
        (300.0, "512", "16", Slo(5.0, 0.1), "prefill", "needs at least 78 > 4 replicas"),
        # a lone 512-token prompt takes 0.266 s: 4 workers cannot keep queueing under 4 ms
        (6.0, "512", "16", Slo(0.27, 0.1, 99), "prefill", "raise --max-replicas"),
    ],
)
def test_infeasible_slos_are_reported_with_the_reason(rate, prompt, output, slo, pool, reason):
    plan = recommend(make_profile(), workload(rate, prompt, output, 500, 0), slo, max_replicas=4)
    assert not plan.feasible
    bad = getattr(plan, pool)
    assert not bad.feasible and bad.num_replicas is None and reason in bad.reason


def run_plan(tmp_path, capsys, *flags) -> tuple[int, str]:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile_json(make_profile())))
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", "--profile", str(path), "--num-requests", "1000", *flags])
    code = args.func(args)
    return code, capsys.readouterr().out


def test_plan_command_prints_and_writes_the_recommendation(tmp_path, capsys):
    out_json = tmp_path / "plan.json"
    code, out = run_plan(
        tmp_path, capsys,
        "--request-rate", "2", "--prompt-len", "uniform:512:1536", "--output-len",
        "uniform:64:256", "--ttft-slo-ms", "2000", "--itl-slo-ms", "50", "--json", str(out_json),
    )  # fmt: skip
    assert code == 0
    assert "prefill: 2 replicas (p90 TTFT" in out and "decode: 2 replicas (p90 ITL" in out
    assert "recommendation: 2 prefill + 2 decode workers" in out
    plan = json.loads(out_json.read_text())
    assert plan["feasible"] and plan["prefill"]["num_replicas"] == 2
    assert {"1", "2", "3"} <= set(plan["prefill"]["simulated"])
    assert plan["profile"]["prefill_tokens_per_s"] == pytest.approx(2048 / 1.034)


def test_plan_command_exits_1_when_infeasible(tmp_path, capsys):
    code, out = run_plan(
        tmp_path, capsys, "--request-rate", "1", "--ttft-slo-ms", "100", "--itl-slo-ms", "50"
    )
    assert code == 1 and "infeasible" in out and "cannot be met" in out


def test_smallest_count_is_found_past_a_low_bound():
    """The search gallops up from the utilisation bound, then bisects: the same answer as
    trying every count in turn."""
    profile = make_profile()
    load = workload(4.0, "uniform:1024:3072", "16", 1500, seed=3)
    plan = recommend(profile, load, Slo(2.5, 0.1))
    n = plan.prefill.num_replicas
    p90 = {m: simulate_prefill(load, m, profile).percentile(90) for m in range(1, n + 1)}
    assert min(m for m in p90 if p90[m] <= 2.5) == n
    assert math.isclose(p90[n], plan.prefill.simulated[n]["latency_s"])
