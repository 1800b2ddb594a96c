"""`tandem bench serve`'s interference, goodput, soak and structured workloads end to end,
shrunk: deployments of the default model, seconds of load each, then the JSON report's keys."""

import argparse
import json

from tandem.bench.serve import add_bench_serve_parser


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_serve_parser(parser.add_subparsers(dest="kind", required=True))
    return parser.parse_args(argv)


def test_interference_measures_itl_before_and_during_long_prompts(default_model, tmp_path):
    out = tmp_path / "interference.json"
    args = _parse(
        [
            "serve",
            "--workload",
            "interference",
            "--model",
            default_model,
            "--server-args",  # every request handed off: the shape this test's load was sized for
            "--dtype float32 --max-local-prefill-length 0",
            "--json",
            str(out),
            "--num-decoders",
            "2",
            "--decode-input-len",
            "8",
            "--decode-output-len",
            "32",
            "--long-input-len",
            "128",
            "--long-prompt-rate",
            "2",
            "--duration-s",
            "3",
            "--baseline-s",
            "2",
            "--warmup-s",
            "0.5",
        ]  # fmt: skip
    )
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert report["workload"] == "interference"
    assert report["params"]["num_decoders"] == 2 and report["params"]["arrivals"] == "poisson"
    assert "kv_transfer_share_of_ttft" in report
    keys = {"disaggregated": "itl_p99_ratio_disagg", "colocated": "itl_p99_ratio_colocated"}
    for name, key in keys.items():
        run = report["deployments"][name]
        assert report[key] == run["itl_p99_ratio"] > 0
        for phase in ("phase_a", "phase_b"):
            assert run[phase]["num_gaps"] > 0 and run[phase]["decode_tok_s"] > 0
            itl = run[phase]["itl_ms"]
            assert 0 < itl["p50"] <= itl["p99"] <= itl["max"] < 5000
        long = run["long_prompts"]
        assert long["sent"] >= 1 and long["failed"] == 0 == run["decoders"]["failed"]
        assert 0 < long["ttft_ms"]["p50"] <= long["ttft_ms"]["p99"]
        assert run["placement"] and "samples" not in run
    assert (tmp_path / "interference.png").read_bytes()[:4] == b"\x89PNG"


def test_goodput_sweeps_rates_and_plots_attainment(default_model, tmp_path, capsys):
    out = tmp_path / "goodput.json"
    args = _parse(
        [
            "serve",
            "--workload",
            "goodput",
            "--model",
            default_model,
            "--server-args",
            "--dtype float32",
            "--json",
            str(out),
            "--rates",
            "1,2",
            "--duration-s",
            "3",
            "--min-input-len",
            "32",
            "--max-input-len",
            "128",
            "--min-output-len",
            "8",
            "--max-output-len",
            "16",
        ]  # fmt: skip
    )
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert report["slo"] == {"ttft_ms": 3000.0, "itl_ms": 150.0}
    assert report["params"]["rates"] == [1.0, 2.0]
    for name, key in (("disaggregated", "goodput_disagg"), ("colocated", "goodput_colocated")):
        run = report["deployments"][name]
        assert report[key] == run["goodput"] in (0.0, 1.0, 2.0)
        assert [row["rate"] for row in run["rates"]] == [1.0, 2.0]
        for row in run["rates"]:
            assert row["sent"] >= 1 and row["failed"] == row["cancelled"]
            assert 0.0 <= row["attainment"] <= 1.0
            assert row["met_slo"] == round(row["attainment"] * row["sent"])
        assert set(report["attainment"][name]) == {"1", "2"}
    assert (tmp_path / "goodput.png").read_bytes()[:4] == b"\x89PNG"
    assert "goodput (req/s)" in capsys.readouterr().out


def test_soak_samples_every_process_memory_and_reports_growth_after_the_mark(
    default_model, tmp_path, capsys
):
    out = tmp_path / "soak.json"
    args = _parse(
        [
            "serve",
            "--workload",
            "soak",
            "--model",
            default_model,
            "--json",
            str(out),
            "--duration-s",
            "6",
            "--max-concurrency",
            "4",
            "--input-len",
            "32",
            "--output-len",
            "16",
            "--disconnect-prob",
            "0.3",
            "--rss-interval-s",
            "1",
            "--max-rss-growth-pct",
            "100",
        ]  # fmt: skip
    )
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert report["workload"]["disconnect_prob"] == 0.3
    for name in ("disaggregated", "colocated"):
        run = report["deployments"][name]
        assert run["failed"] == 0 and run["leaked_blocks"] == 0 and run["idle_after"]
        assert run["completed"] + run["disconnected"] > 0 and run["output_tok_s"] > 0
        assert len(run["rss_samples"]) >= 5  # the start, one a second, the end
        assert 1.0 <= run["rss_mark_s"] <= 4.0  # the first sample past a fifth of the run
        roles = {key.split()[0] for key in run["rss_growth_pct_after_mark"]}
        assert ({"prefill", "decode", "gateway"} if name == "disaggregated" else {"serve"}) <= roles
        assert run["rss_mib_mark"].keys() == run["rss_growth_pct_after_mark"].keys()
        assert report["rss_worst"][name] == run["rss_worst"]
        assert run["rss_worst"]["process"] in run["rss_mib_end"]
    assert "worst growth after the mark" in capsys.readouterr().out


def _shortest_instance(schema: dict):
    """The shortest value the kinds of schema the structured workload uses allow."""
    kind = schema["type"]
    if kind == "object":
        return {key: _shortest_instance(schema["properties"][key]) for key in schema["required"]}
    if kind == "array":
        return [_shortest_instance(schema["items"])] * schema.get("minItems", 0)
    if kind == "string":
        return "a" * schema.get("minLength", 0)
    if kind == "integer":
        return schema.get("minimum", 0)
    assert kind == "boolean", kind
    return True


def test_structured_schema_shortest_output_is_past_128_tokens_whatever_the_tokens(
    default_model,
):
    import jsonschema
    from transformers import AutoTokenizer

    from tandem.bench.structured_cost import SCHEMA

    shortest = _shortest_instance(SCHEMA)
    jsonschema.validate(shortest, SCHEMA)
    text = json.dumps(shortest)  # ", " and ": ": the layout the server generates
    tokenizer = AutoTokenizer.from_pretrained(default_model)
    assert len(tokenizer(text)["input_ids"]) > 128
    # any tokenization: no token holds two digits, and the output holds more than 128 digits
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert all(sum(c.isdigit() for c in token) <= 1 for token in tokens)
    assert sum(c.isdigit() for c in text) > 128


def test_structured_measures_constrained_against_unconstrained_and_grammar_costs(
    default_model, tmp_path, capsys
):
    out = tmp_path / "structured.json"
    args = _parse(
        [
            "serve",
            "--workload",
            "structured",
            "--model",
            default_model,
            "--server-args",  # every request handed off: grammars compile on both workers
            "--dtype float32 --torch-threads 1 --max-local-prefill-length 0",
            "--json",
            str(out),
            "--num-prompts",
            "4",
            "--max-concurrency",
            "2",
            "--input-len",
            "16",
            "--output-len",
            "8",
            "--rounds",
            "1",
        ]  # fmt: skip
    )
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert report["ratio"] > 0 and report["baseline_ratio"] > 0
    assert len(report["output_tok_s_constrained"]) == 1 == len(report["output_tok_s_unconstrained"])
    assert 0 < report["mask_ms_per_step"] < 1000 and 0 < report["mask_share_of_step"] < 1
    assert 0 < report["compile_ms_cold"] < 60_000 and 0 <= report["compile_ms_cached"] < 60_000
    assert {key.split()[0] for key in report["compile_ms_cold_per_worker"]} == {"prefill", "decode"}
    run = report["deployments"]["disaggregated"]
    assert run["first_request"]["output_head"].startswith('{"sensor"')
    assert run["decode"]["unconstrained"]["num_masked_steps"] == 0
    assert "ratio constrained / unconstrained" in capsys.readouterr().out
