"""The plots of `tandem bench serve` (`--plot`, by default next to `--json`): one PNG per run,
one line or bar per deployment. matplotlib is imported here only, when a plot is drawn:
neither serving nor benchmarking needs it, and without it the plot is skipped in one line."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from tandem.bench.load import LatencySamples


def plot_path(args: argparse.Namespace) -> Path | None:
    """`--plot`, else `--json`'s path with .png, else None (no plot)."""
    if getattr(args, "plot", None):
        return Path(args.plot)
    return Path(args.json).with_suffix(".png") if getattr(args, "json", None) else None


def try_plot(path: Path, draw: Callable[[Path], None]) -> bool:
    """`draw(path)`, then print where the plot went; or one line saying it was skipped for
    want of matplotlib. Whether it was written."""
    try:
        draw(path)
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)")
        return False
    print(f"plot: {path}")
    return True


def _pyplot():
    import matplotlib  # only here: see the module doc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path, title: str) -> None:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cdf(ax, values_s: Sequence[float], label: str, **style) -> None:
    """The empirical CDF of durations in seconds, drawn in ms; p50 and p99 in the label."""
    if not len(values_s):
        ax.plot([], [], label=f"{label} (no samples)", **style)
        return
    ms = np.sort(np.asarray(values_s, dtype=float)) * 1000.0
    share = 100.0 * np.arange(1, len(ms) + 1) / len(ms)
    p50, p99 = np.percentile(ms, [50, 99])
    ax.step(ms, share, where="post", label=f"{label} (p50 {p50:.1f}, p99 {p99:.1f})", **style)


def _cdf_axes(ax, xlabel: str, title: str, values_ms: Sequence[float]) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share at or below (%)")
    ax.set_ylim(0, 101)
    ax.set_title(title, fontsize=10)
    positive = [v for v in values_ms if v > 0]
    if positive and max(positive) / min(positive) > 50:  # long tails: a log axis shows both ends
        ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)


def plot_latency(
    samples: Mapping[str, LatencySamples],
    output_tok_s: Mapping[str, float],
    path: Path,
    title: str,
) -> None:
    """TTFT and ITL CDFs, one line per deployment, and output tok/s as bars, side by side."""
    plt = _pyplot()
    fig, (ax_ttft, ax_itl, ax_tok) = plt.subplots(1, 3, figsize=(15, 4.4))
    colors = {name: f"C{i}" for i, name in enumerate(output_tok_s | dict.fromkeys(samples))}
    for name, s in samples.items():
        _cdf(ax_ttft, s.ttft_s, name, color=colors[name])
        _cdf(ax_itl, s.itl_s, name, color=colors[name])
    ttft_ms = [1000 * v for s in samples.values() for v in s.ttft_s]
    itl_ms = [1000 * v for s in samples.values() for v in s.itl_s]
    _cdf_axes(ax_ttft, "time to first token (ms)", "TTFT", ttft_ms)
    _cdf_axes(ax_itl, "inter-token latency (ms)", "ITL", itl_ms)
    names = list(output_tok_s)
    bars = ax_tok.bar(names, [output_tok_s[n] for n in names],
                      color=[colors[n] for n in names])  # fmt: skip
    ax_tok.bar_label(bars, fmt="%.1f", fontsize=8)
    ax_tok.set_ylabel("output tokens/s")
    ax_tok.set_title("output throughput", fontsize=10)
    ax_tok.grid(True, axis="y", alpha=0.3)
    _save(plt, fig, path, title)


def plot_interference(
    samples: Mapping[str, Mapping[str, Sequence[float]]],
    itl_p99_ratio: Mapping[str, float | None],
    path: Path,
    title: str,
) -> None:
    """Per deployment, the decoders' ITL CDF in phase A (decoding alone) and phase B (with
    long prompts arriving), one subplot each, on the same axes."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(samples), figsize=(6 * len(samples), 4.4), squeeze=False,
                             sharex=True, sharey=True)  # fmt: skip
    all_ms = [1000 * v for phases in samples.values() for gaps in phases.values() for v in gaps]
    for ax, (name, phases) in zip(axes[0], samples.items()):
        _cdf(ax, phases["phase_a"], "A: decode only", color="C0")
        _cdf(ax, phases["phase_b"], "B: + long prompts", color="C3", linestyle="--")
        ratio = itl_p99_ratio.get(name)
        label = f"{name}: ITL p99 B/A " + (f"{ratio:.2f}x" if ratio is not None else "n/a")
        _cdf_axes(ax, "inter-token latency (ms)", label, all_ms)
    _save(plt, fig, path, title)


def plot_attainment(runs: Mapping[str, dict], target: float, path: Path, title: str) -> None:
    """Goodput: SLO attainment against request rate, one line per deployment (its goodput in
    the legend), with the target attainment's line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = [("o", "-"), ("s", "--"), ("^", ":")]  # lines that coincide stay visible
    for (name, f), (marker, line) in zip(runs.items(), styles * len(runs)):
        rates = [row["rate"] for row in f["rates"]]
        attained = [100 * row["attainment"] for row in f["rates"]]
        label = f"{name} (goodput {f['goodput']:g} req/s)"
        ax.plot(rates, attained, marker=marker, linestyle=line, label=label)
    rates = sorted({row["rate"] for f in runs.values() for row in f["rates"]})
    ax.axhline(100 * target, color="gray", linestyle="--", linewidth=1, label=f"{target:.0%}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.minorticks_off()
    ax.set_xlabel("request rate (req/s, Poisson)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-2, 102)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=9)
    _save(plt, fig, path, title)
