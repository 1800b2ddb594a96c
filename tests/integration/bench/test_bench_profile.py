"""`tandem bench profile` on a tiny model writes a profile that `tandem plan` turns into a
recommendation."""

import argparse
import json
import re

import pytest
import torch

from tandem.bench.profile import add_bench_profile_parser
from tandem.planner import Profile, add_plan_parser


def run_command(add_parser, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_profile_then_plan(tiny_llama, tmp_path, capsys, keep_torch_threads):
    path = tmp_path / "profile.json"
    code = run_command(
        add_bench_profile_parser,
        ["profile", "--model", tiny_llama, "--dtype", "float32", "--torch-threads", "1",
         "--num-gpu-blocks-override", "64", "--max-num-batched-tokens", "128",
         "--prefill-tokens", "16,64,512", "--batch-sizes", "1,2,4,8", "--context-lens", "16,48",
         "--repeats", "2", "--decode-steps", "2", "--output", str(path)],
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "prefill tokens" in out and "decode batch" in out and "fit: step =" in out

    profile = json.loads(path.read_text())
    assert profile["machine"]["device"] == "cpu" and profile["machine"]["dtype"] == "float32"
    assert profile["machine"]["torch_threads"] == 1 and profile["machine"]["pinning"]
    cap = profile["capacity"]
    assert cap["num_blocks"] == 64 and cap["block_size"] == 16
    assert cap["max_num_batched_tokens"] == 128 and cap["max_model_len"] == 512
    # 2 layers x (K, V) x 2 KV heads x head_dim 12 x 4 bytes
    assert cap["kv_bytes_per_token"] == 2 * 2 * 2 * 12 * 4
    prefill = profile["prefill"]
    assert list(prefill["step_s"]) == ["16", "64", "128"]  # 512 is past the budget
    assert all(len(s) == 2 and min(s) > 0 for s in prefill["samples_s"].values())
    assert prefill["fit"]["a_s"] >= 0 and prefill["fit"]["b_s_per_token"] > 0
    assert prefill["tokens_per_s"] > 0
    decode = profile["decode"]["step_s"]
    assert list(decode) == ["16", "48"]
    assert all(list(t) == ["1", "2", "4", "8"] for t in decode.values())
    assert all(s > 0 for t in decode.values() for s in t.values())
    loaded = Profile.from_json(profile)

    # SLOs generous against the figures just measured, at a light load: feasible
    longest = loaded.prefill_step(128) * 4
    slowest = max(s for t in decode.values() for s in t.values())
    rate = 0.2 * loaded.prefill_tokens_per_s / 64
    code = run_command(
        add_plan_parser,
        ["plan", "--profile", str(path), "--request-rate", f"{rate}",
         "--prompt-len", "uniform:8:64", "--output-len", "uniform:4:24",
         "--ttft-slo-ms", f"{longest * 10e3}", "--itl-slo-ms", f"{slowest * 10e3}",
         "--num-requests", "400", "--json", str(tmp_path / "plan.json")],
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"prefill: \d+ replicas? \(p90 TTFT", out), out
    assert re.search(r"decode: \d+ replicas? \(p90 ITL", out), out
    assert re.search(r"recommendation: \d+ prefill \+ \d+ decode workers", out), out
    assert json.loads((tmp_path / "plan.json").read_text())["feasible"]
