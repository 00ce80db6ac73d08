"""A human-readable report: Markdown plus PNG plots, next to the machine-readable JSON.

Plots: the singular-value spectrum of every layer (with its break-even rank), the
metric against rank for each layer the search probed, and size/MACs against the
metric for every whole-model evaluation. matplotlib is optional
(``pip install 'rankshrink[report]'``); without it the Markdown is still written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .analysis import Analysis
from .errors import ConfigError
from .files import atomic_path, atomic_write_json, atomic_write_text, prepare_output_dir


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)  # files only, never a window
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_spectra(analysis: Analysis, path: Path) -> bool:
    plt = _pyplot()
    if plt is None or not analysis.layers:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for layer in analysis.layers:
        values = [v / layer.singular_values[0] for v in layer.singular_values] if layer.singular_values[0] else []
        line, = ax.semilogy(range(1, len(values) + 1), values, label=layer.name)
        # the spectrum is that of the (out, in·k…) matrix; its own truncated SVD's break-even rank
        cap = layer.spectrum_break_even
        if 1 <= cap <= len(values):
            ax.axvline(cap, color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("rank")
    ax.set_ylabel("σ_i / σ_1 (log)")
    ax.set_title("Singular-value spectra (dotted: break-even rank)")
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return True


def plot_metric_vs_rank(curves: Mapping[str, Sequence[tuple[int, float]]], path: Path,
                        metric: str = "accuracy", baseline: float | None = None) -> bool:
    plt = _pyplot()
    if plt is None or not curves:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, points in curves.items():
        ordered = sorted(points)
        ax.plot([p[0] for p in ordered], [p[1] for p in ordered], marker="o", markersize=3, label=name)
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", linewidth=1, label="original")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank (this layer only factorized)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs rank, per layer")
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return True


def plot_size_vs_metric(points: Iterable[Mapping[str, Any]], path: Path, *, x: str = "macs",
                        metric: str = "accuracy", original: Mapping[str, Any] | None = None) -> bool:
    plt = _pyplot()
    points = [p for p in points if x in p and metric in p]
    if plt is None or not points:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.scatter([p[x] for p in points], [p[metric] for p in points], s=14, alpha=0.7, label="evaluated plans")
    chosen = [p for p in points if p.get("chosen")]
    if chosen:
        ax.scatter([p[x] for p in chosen], [p[metric] for p in chosen], s=80, marker="*", color="red",
                   label="chosen")
    if original and x in original and metric in original:
        ax.scatter([original[x]], [original[metric]], s=60, marker="s", color="black", label="original")
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {x}")
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return True


def write_report(directory: str | os.PathLike, analysis: Analysis, *,
                 curves: Mapping[str, Sequence[tuple[int, float]]] | None = None,
                 tradeoff: Sequence[Mapping[str, Any]] | None = None,
                 summary: Mapping[str, Any] | None = None, metric: str = "accuracy",
                 force: bool = True) -> Path:
    """Write ``report.md``, ``report.json`` and the PNG plots into ``directory``.

    ``curves``: layer -> [(rank, metric)] from single-layer probes; ``tradeoff``: dicts
    with 'macs'/'params' and the metric for whole-model evaluations (``chosen`` marks
    the result); ``summary``: before/after numbers to tabulate.
    """
    if metric not in ("accuracy", "agreement") and not metric:
        raise ConfigError("metric name must be non-empty.")
    directory = prepare_output_dir(directory, force=force)
    figures = []
    if plot_spectra(analysis, directory / "spectra.png"):
        figures.append(("Singular-value spectra", "spectra.png"))
    baseline = (summary or {}).get("original", {}).get(metric) if summary else None
    if curves and plot_metric_vs_rank(curves, directory / "metric_vs_rank.png", metric, baseline):
        figures.append((f"{metric} vs rank", "metric_vs_rank.png"))
    if tradeoff and plot_size_vs_metric(tradeoff, directory / "macs_vs_metric.png", metric=metric,
                                        original=(summary or {}).get("original")):
        figures.append((f"{metric} vs MACs", "macs_vs_metric.png"))

    lines = ["# rankshrink report", ""]
    if summary and "original" in summary and "compressed" in summary:
        before, after = summary["original"], summary["compressed"]
        lines += ["| | original | compressed |", "|---|---:|---:|"]
        for key in ("accuracy", "test_accuracy", "params", "bytes", "macs"):
            if key in before and key in after:
                lines.append(f"| {key} | {_fmt(before[key])} | {_fmt(after[key])} |")
        lines.append("")
    lines += ["## Layers", "", "| layer | type | weight | params | MACs | break-even rank (params) | rank for 90% / "
                               "99% energy |",
              "|---|---|---|---:|---:|---|---|"]
    for layer in analysis.layers:
        be = ", ".join(f"{m} {layer.break_even[m]['params']}" for m in layer.methods)
        lines.append(f"| {layer.name} | {layer.type} | {'×'.join(map(str, layer.weight_shape))} | {layer.params} | "
                     f"{layer.macs} | {be} | {layer.rank_for_energy['90%']} / {layer.rank_for_energy['99%']} |")
    for name, reason in analysis.skipped:
        lines.append(f"\nSkipped `{name}`: {reason}.")
    for title, filename in figures:
        lines += ["", f"## {title}", "", f"![{title}]({filename})"]
    atomic_write_text(directory / "report.md", "\n".join(lines) + "\n")
    atomic_write_json(directory / "report.json", {
        "analysis": analysis.to_dict(), "summary": dict(summary or {}),
        "curves": {k: [list(p) for p in v] for k, v in (curves or {}).items()},
        "tradeoff": [dict(p) for p in (tradeoff or [])], "figures": [f for _, f in figures]})
    return directory


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
