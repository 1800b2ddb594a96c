"""The spec workload's pure parts: its two deployments from its flag, its shipped texts as
chat prompts, and the report's ratios."""

from __future__ import annotations

import argparse
import json

from tandem.bench import spec_cost


def _figures(tpot: float, rate=None, length=None) -> dict:
    return {"tpot_ms": {"p50": tpot}, "failed": 0, "acceptance_rate": rate,
            "mean_accepted_length": length}  # fmt: skip


def test_deployments_and_report():
    args = argparse.Namespace(spec_config=json.dumps(spec_cost.DEFAULT_SPEC))
    d = spec_cost.deployments(args)
    assert d["no-spec"] == [] and json.loads(d["spec"][1]) == spec_cost.DEFAULT_SPEC
    off = {k: _figures(20.0) for k in ("grounded_c1", "grounded_c8", "random_c1", "random_c8")}
    off["plain_c1"] = _figures(19.0)
    on = {
        "grounded_c1": _figures(10.0, 0.8, 4.2),
        "grounded_c8": _figures(12.0, 0.7, 3.8),
        "random_c1": _figures(20.5, 0.01, 1.04),
        "random_c8": _figures(20.2, 0.0, 1.0),
    }
    on |= {"url": "http://x", "placement": []}  # as bench_one adds them
    report, ok = spec_cost.report({"no-spec": off, "spec": on}, args)
    assert ok and report["tpot_ratio_grounded_c1"] == 0.5
    assert report["tpot_ratio_random_c8"] == 20.2 / 20.0
    assert report["acceptance_rate"] == 0.8
    assert abs(report["no_spec_tpot_vs_plain"] - 20.0 / 19.0) < 1e-9


def test_the_shipped_texts_become_chat_prompts_that_hold_them(default_model):
    prompts = spec_cost.grounded_prompts(default_model)
    assert len(prompts) == len(spec_cost.RENAMES)
    assert all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompts)
    from tandem.engine.tokenizer import load_tokenizer

    text = load_tokenizer(default_model).decode(prompts[0])
    assert "renaming `quantity` to `count`" in text and "def total_value_cents" in text
