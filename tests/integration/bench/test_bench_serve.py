"""`tandem bench serve` end to end: it starts a real server on the default model, drives a
small streaming load, and writes its figures."""

import argparse
import json

from tandem.bench.serve import add_bench_serve_parser


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_serve_parser(parser.add_subparsers(dest="kind", required=True))
    return parser.parse_args(argv)


def test_bench_serve_compares_disaggregated_with_colocated(default_model, tmp_path, capsys):
    out = tmp_path / "serve.json"
    args = _parse(
        [
            "serve",
            "--model",
            default_model,
            "--num-prompts",
            "4",
            "--max-concurrency",
            "2",
            "--input-len",
            "16",
            "--output-len",
            "8",
            "--json",
            str(out),
            "--server-args",
            "--dtype float32 --torch-threads 1",
        ]  # fmt: skip
    )
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert report["output_tok_s"] > 0
    assert report["ttft_p50_ms"] > 0 and report["itl_p50_ms"] > 0
    for name in ("disaggregated", "colocated"):
        run = report["deployments"][name]
        assert (run["completed"], run["failed"]) == (4, 0)
        assert run["output_lens"] == [8] * 4
    assert report["deployments"]["disaggregated"]["output_tok_s"] == report["output_tok_s"]
    assert report["deployments"]["colocated"]["output_tok_s"] == report["colocated_tok_s"]
    assert report["ratio"] == report["output_tok_s"] / report["colocated_tok_s"]
    stages = {p["name"] for p in report["deployments"]["disaggregated"]["placement"]}
    assert {"gateway", "tokenizer", "scheduler", "prefill", "decode", "nats-server"} <= stages
    printed = capsys.readouterr().out
    assert "placement of colocated" in printed and "TTFT" in printed
    # the raw samples went to the plot (next to the JSON), not into the JSON
    assert set(report) == {"output_tok_s", "colocated_tok_s", "ratio", "ttft_p50_ms",
                           "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "deployments"}  # fmt: skip
    assert not any("samples" in run for run in report["deployments"].values())
    assert (tmp_path / "serve.png").read_bytes()[:4] == b"\x89PNG"
    assert f"plot: {tmp_path / 'serve.png'}" in printed
