"""The plots of `tandem bench serve`: PNGs from synthetic samples, and the path they go to."""

import argparse
import builtins
import random
from functools import partial
from pathlib import Path

import pytest

from tandem.bench import plots
from tandem.bench.load import SAMPLES, LatencySamples, RequestResult, latency_samples
from tandem.bench.serve import take_samples

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _samples(seed: int, ttft_s: float, itl_s: float) -> LatencySamples:
    rng = random.Random(seed)
    return LatencySamples(
        [rng.expovariate(1 / ttft_s) for _ in range(64)],
        [rng.expovariate(1 / itl_s) for _ in range(2000)],
    )


def test_plot_latency_writes_a_png_with_one_line_per_deployment(tmp_path):
    pytest.importorskip("matplotlib")
    samples = {"disaggregated": _samples(0, 0.2, 0.03), "colocated": _samples(1, 0.3, 0.05)}
    path = tmp_path / "bench.png"
    plots.plot_latency(samples, {"disaggregated": 120.0, "colocated": 95.5}, path, "title")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_latency_draws_a_deployment_without_samples(tmp_path):
    pytest.importorskip("matplotlib")
    samples = {"server": LatencySamples([], [])}
    plots.plot_latency(samples, {"server": 0.0}, tmp_path / "empty.png", "nothing completed")
    assert (tmp_path / "empty.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_interference_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rng = random.Random(0)
    gaps = {
        name: {"phase_a": [rng.uniform(0.02, 0.04) for _ in range(500)],
               "phase_b": [rng.uniform(0.02, 0.4) for _ in range(500)]}
        for name in ("disaggregated", "colocated")
    }  # fmt: skip
    path = tmp_path / "interference.png"
    plots.plot_interference(gaps, {"disaggregated": 1.1, "colocated": None}, path, "title")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_path_is_the_flag_else_next_to_the_json_else_none():
    def args(**kw):
        return argparse.Namespace(**({"plot": None, "json": None} | kw))

    assert plots.plot_path(args(plot="p.png", json="r.json")) == Path("p.png")
    assert plots.plot_path(args(json="out/r.json")) == Path("out/r.png")
    assert plots.plot_path(args()) is None


def test_try_plot_says_in_one_line_when_matplotlib_is_missing(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    path = tmp_path / "p.png"
    draw = partial(plots.plot_latency, {"server": _samples(0, 0.1, 0.01)}, {"server": 1.0})
    assert not plots.try_plot(path, lambda p: draw(p, "t"))
    assert not path.exists()
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "plot skipped" in out


def test_samples_are_taken_out_of_the_figures_before_the_json():
    done = RequestResult(True, ttft=0.1, itl=[0.01, 0.02], e2e=0.13, output_tokens=3)
    samples = latency_samples([done, RequestResult(False, error="x")])
    assert samples == LatencySamples([0.1], [0.01, 0.02])
    runs = {
        "disaggregated": {"output_tok_s": 1.0, SAMPLES: samples},
        "tracing-on": [{"output_tok_s": 2.0, SAMPLES: samples}, {"output_tok_s": 3.0}],
        "colocated": {"output_tok_s": 4.0},
    }
    taken = take_samples(runs)
    assert taken == {"disaggregated": samples, "tracing-on": samples}
    assert runs == {
        "disaggregated": {"output_tok_s": 1.0},
        "tracing-on": [{"output_tok_s": 2.0}, {"output_tok_s": 3.0}],
        "colocated": {"output_tok_s": 4.0},
    }
