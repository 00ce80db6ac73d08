"""``report.html``: one self-contained page drawn from a run directory (summary.json and plan.json).

Written by ``rankshrink report DIR`` and at the end of ``compress``, ``apply`` and ``finetune``
(unless ``--no-report``). The page has no scripts, no external files and no fonts: the plots
are SVG documents from matplotlib (text as paths) embedded as ``data:`` images, so each is
isolated from the others and the page opens offline, from e-mail or a phone. Sections:
summary (before/after metric, per class with labels, test metric, params, bytes, MACs, and the
latency and int8 rows when the run has them), the per-layer table, the singular-value spectra,
the metric-vs-rank curves of the probed layers, the metric-vs-MACs scatter of every evaluated
plan with its Pareto front, and how the run was made. A section whose data the run does not
hold says so instead ("render what is there"); one that needs labels says that.

Every number shown that comes from summary.json carries ``data-key``: the JSON pointer
(RFC 6901) of its value in summary.json, so a test (or a person) can check the page against
the file. This module needs no torch; matplotlib is the ``report`` extra, and without it the
page is written with its tables and a note where the plots would be.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .errors import FileFormatError

REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.json"
PLAN_FILE = "plan.json"
_NEEDS_LABELS = ("needs labels: the data of this run has no labels, so accuracy is not measured "
                 "(the search compared predictions with the original model's instead)")
# Keys a summary of each kind must hold for the page to make sense.
_REQUIRED = {"compress": ("original", "compressed", "layers"), "apply": ("plan",),
             "finetune": ("plan", "accuracy", "finetune")}
_NUMBER_PATHS = {"compress": ("/original/params", "/original/macs", "/original/bytes", "/compressed/params",
                              "/compressed/macs", "/compressed/bytes"), "apply": (), "finetune": ()}


# --------------------------------------------------------------------------- reading a run

def summary_kind(summary: Mapping[str, Any]) -> str | None:
    """'compress', 'apply' or 'finetune' for a summary those commands write, else None."""
    fmt = summary.get("format")
    if fmt == "rankshrink-compress-summary":
        return "compress"
    if fmt == "rankshrink-apply-summary":
        return "apply"
    if summary.get("command") == "finetune":
        return "finetune"
    return None


def pointer(*parts: Any) -> str:
    """The JSON pointer (RFC 6901) of ``parts``: ``pointer('spectra', 'features.2')`` -> '/spectra/features.2'."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def resolve(document: Any, path: str) -> Any:
    """The value at JSON pointer ``path`` in ``document`` (KeyError/IndexError when absent)."""
    value = document
    for raw in path.split("/")[1:]:
        part = raw.replace("~1", "/").replace("~0", "~")
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def load_run(directory: str | os.PathLike) -> dict[str, Any]:
    """summary.json of a run directory, checked well enough to draw; one clear error otherwise."""
    from .files import recover_output_dir

    path = Path(directory)
    hint = "point 'rankshrink report' at a directory written by compress, apply or finetune."
    if not path.exists():
        raise FileFormatError(f"'{path}' does not exist; {hint}")
    if not path.is_dir():
        raise FileFormatError(f"'{path}' is not a directory; {hint}")
    recover_output_dir(path)  # a set cut short by a killed run is finished (or discarded) first
    file = path / SUMMARY_FILE
    if not file.is_file():
        raise FileFormatError(f"'{path}' holds no rankshrink run (no {SUMMARY_FILE}); {hint}")
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise FileFormatError(f"'{file}' is corrupt (not UTF-8 text); rerun the command that wrote '{path}'.") from None
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"'{file}' is corrupt (not valid JSON: {exc.msg} at line {exc.lineno} column "
                              f"{exc.colno}); rerun the command that wrote '{path}'.") from None
    if not isinstance(summary, dict):
        raise FileFormatError(f"'{file}' is corrupt (a JSON {type(summary).__name__}, not an object); rerun the "
                              f"command that wrote '{path}'.")
    kind = summary_kind(summary)
    if kind is None:
        what = f"format {summary['format']!r}" if "format" in summary else "it has no 'format'"
        raise FileFormatError(f"'{file}' is not the summary of a compress, apply or finetune run ({what}); {hint}")
    missing = [key for key in _REQUIRED[kind] if key not in summary]
    if missing:
        raise FileFormatError(f"'{file}' is incomplete: it lacks {', '.join(repr(k) for k in missing)}; rerun the "
                              f"command that wrote '{path}'.")
    for where in _NUMBER_PATHS[kind]:
        try:
            value = resolve(summary, where)
        except (KeyError, IndexError, TypeError, ValueError):
            raise FileFormatError(f"'{file}' is incomplete: it lacks '{where[1:].replace('/', '.')}'; rerun the "
                                  f"command that wrote '{path}'.") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FileFormatError(f"'{file}' is corrupt: '{where[1:].replace('/', '.')}' is "
                                  f"{type(value).__name__}, not a number; rerun the command that wrote '{path}'.")
    plan_file = path / PLAN_FILE
    if plan_file.is_file() and "plan" not in summary:
        try:
            summary["plan"] = json.loads(plan_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass  # the chosen plan is then found by its costs
    return summary


# --------------------------------------------------------------------------- formatting

def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value: Any, style: str = "auto") -> str:
    """Exact integers with separators; fractions as percentages with 2 decimals; other floats, 4 significant."""
    if value is None:
        return "–"
    if not _is_number(value):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if style == "pct":
        return f"{100 * value:.2f}%"
    if style == "ratio":
        return f"{value:.3f}×"
    if style == "ms":
        return f"{value:.4g} ms"
    if isinstance(value, int) or (style == "int" and float(value).is_integer()):
        return f"{int(value):,}"
    return f"{value:.4g}"


def _num(summary_path: str | None, value: Any, style: str = "auto", tag: str = "td", cls: str = "num") -> str:
    """A cell showing ``value``; with ``summary_path`` it carries the value's place in summary.json."""
    attrs = f' class="{cls}"'
    if summary_path is not None and value is not None:
        attrs += f' data-key="{_esc(summary_path)}" data-value="{_esc(json.dumps(value))}"'
    return f"<{tag}{attrs}>{_esc(_fmt(value, style))}</{tag}>"


def _table(headers: Sequence[str], rows: Iterable[str], cls: str = "") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join(f"<tr>{row}</tr>" for row in rows)
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _rank_text(rank: Any) -> str:
    if rank is None:
        return ""
    if isinstance(rank, (list, tuple)):
        return "×".join(str(r) for r in rank)
    return str(rank)


def _a(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _get(mapping: Any, *keys: Any) -> Any:
    for key in keys:
        if not isinstance(mapping, Mapping) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


# --------------------------------------------------------------------------- plots (matplotlib → SVG)

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)  # files only, never a window
    matplotlib.rcParams.update({"svg.fonttype": "path", "svg.hashsalt": "rankshrink", "font.size": 9.5,
                                "axes.spines.top": False, "axes.spines.right": False})
    import matplotlib.pyplot as plt
    return plt


def _svg(fig) -> str:
    """The figure as an SVG ``data:`` URI (deterministic: no date, fixed ids)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(uri: str, alt: str, caption: str, kind: str, points: int) -> str:
    return (f'<figure class="plot" data-plot="{_esc(kind)}" data-points="{points}"><img src="{uri}" '
            f'alt="{_esc(alt)}" loading="eager"><figcaption>{caption}</figcaption></figure>')


def spectrum_plot(plt, name: str, entry: Mapping[str, Any]) -> str | None:
    values = [float(v) for v in entry.get("singular_values") or [] if _is_number(v)]
    if not values or values[0] <= 0:
        return None
    ranks = range(1, len(values) + 1)
    fig, ax = plt.subplots(figsize=(4.6, 2.9))
    ax.semilogy(ranks, [max(v / values[0], 1e-12) for v in values], color="#1f5fa8", linewidth=1.4,
                label="σᵢ / σ₁")
    be = entry.get("spectrum_break_even")
    if isinstance(be, int) and 1 <= be <= len(values):
        ax.axvline(be, color="#888888", linestyle=":", linewidth=1.3, label=f"break-even r = {be}")
    chosen = entry.get("chosen_rank")
    if isinstance(chosen, int) and 1 <= chosen <= len(values):
        ax.axvline(chosen, color="#c0392b", linewidth=1.6, label=f"chosen r = {chosen}")
        ax.axvspan(chosen, len(values), color="#c0392b", alpha=0.06)
    ax.set_xlabel("rank i")
    ax.set_ylabel("σᵢ / σ₁ (log)")
    matrix = entry.get("matrix")
    shape = "×".join(str(v) for v in matrix) if isinstance(matrix, list) else ""
    ax.set_title(f"{name}  ({shape})" if shape else name, fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    uri = _svg(fig)
    plt.close(fig)
    return uri


def curve_plot(plt, name: str, series: Mapping[str, list[tuple[float, float]]], baseline: float | None,
               floor: float | None, metric: str) -> str:
    fig, ax = plt.subplots(figsize=(4.6, 2.9))
    for method, points in sorted(series.items()):
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3.5, linewidth=1.2,
                label=method)
    if baseline is not None:
        ax.axhline(baseline, color="#555555", linestyle="--", linewidth=1, label="original")
    if floor is not None:
        ax.axhline(floor, color="#c0392b", linestyle=":", linewidth=1.2, label="tolerance")
    ax.set_xlabel("rank (this layer alone factorized)")
    ax.set_ylabel(metric)
    ax.set_title(name, fontsize=9.5)
    ax.legend(fontsize=8, frameon=False)
    uri = _svg(fig)
    plt.close(fig)
    return uri


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both: fewer (or equal) MACs and a higher (or equal) metric."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def tradeoff_plot(plt, points: Sequence[tuple[float, float]], chosen: tuple[float, float] | None,
                  original: tuple[float, float] | None, metric: str, floor: float | None = None) -> str:
    fig, ax = plt.subplots(figsize=(7.2, 4.0))
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=16, alpha=0.5, color="#1f5fa8",
               label=f"evaluated plans ({len(points)})")
    front = pareto_front(points)
    right = max(p[0] for p in points)
    ax.step([p[0] for p in front] + [right], [p[1] for p in front] + [front[-1][1]], where="post",
            color="#e67e22", linewidth=1.8, label=f"Pareto front ({len(front)})", zorder=2)
    ax.scatter([p[0] for p in front], [p[1] for p in front], s=34, facecolors="none", edgecolors="#e67e22",
               linewidths=1.5, zorder=2)
    if floor is not None:
        ax.axhline(floor, color="#c0392b", linestyle=":", linewidth=1.2, label="tolerance")
    if original is not None:
        ax.scatter([original[0]], [original[1]], s=60, marker="s", color="#222222", label="original", zorder=3)
    if chosen is not None:
        ax.scatter([chosen[0]], [chosen[1]], s=170, marker="*", color="#c0392b", label="chosen plan", zorder=4)
    ax.set_xlabel("MACs per sample")
    ax.set_ylabel(f"{metric} (validation)")
    ax.set_title(f"{metric} vs MACs of every evaluated plan", fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="best")
    uri = _svg(fig)
    plt.close(fig)
    return uri


# --------------------------------------------------------------------------- sections

def _has_labels(summary: Mapping[str, Any], kind: str) -> bool:
    if kind == "finetune":
        return any(_is_number(_get(summary, "accuracy", k, "val")) for k in summary["accuracy"])
    return any(_is_number(_get(summary, side, "accuracy")) for side in ("original", "compressed")) \
        or "per_class" in summary


def _accuracy_table(summary: Mapping[str, Any], kind: str) -> str:
    """Validation and test accuracy (and the search metric) of each model the run compares."""
    if kind == "apply":
        return ""
    if kind == "finetune":
        sides = [(title, key) for title, key in (("original", "original"), ("factorized", "factorized"),
                                                 ("fine-tuned", "finetuned")) if key in summary["accuracy"]]
        quantities = [("validation accuracy", "val"), ("test accuracy", "test")]
        rows = []
        for title, key in quantities:
            cells = [_num(pointer("accuracy", side, key), _get(summary, "accuracy", side, key), "pct")
                     for _, side in sides]
            rows.append(f"<th>{_esc(title)}</th>" + "".join(cells))
        return _table([""] + [title for title, _ in sides], rows, "accuracy")
    sides = [("original", "original"), ("compressed", "compressed")]
    metric = summary.get("metric")
    quantities = [("validation accuracy", "accuracy"), ("test accuracy", "test_accuracy")]
    if metric and metric != "accuracy":
        quantities.append((f"{metric} (validation; the search metric)", "metric"))
    rows = []
    for title, key in quantities:
        values = [_get(summary, side, key) for _, side in sides]
        if not any(_is_number(v) for v in values):
            rows.append(f"<th>{_esc(title)}</th>" + '<td class="needs-labels">needs labels</td>' * len(sides)
                        + "<td></td>")
            continue
        shown = "".join(_num(pointer(side, key), value, "pct") for (_, side), value in zip(sides, values))
        change = (f'<td class="num">{100 * (values[1] - values[0]):+.2f} pts</td>'
                  if all(_is_number(v) for v in values) else "<td></td>")
        rows.append(f"<th>{_esc(title)}</th>{shown}{change}")
    return _table(["", "original", "compressed", "change"], rows, "accuracy")


def _cost_table(summary: Mapping[str, Any]) -> str:
    """Parameters, bytes and MACs of the original and the compressed model, where recorded."""
    rows = []
    for title, key in (("parameters", "params"), ("bytes", "bytes"), ("MACs per sample", "macs")):
        before, after = _get(summary, "original", key), _get(summary, "compressed", key)
        if not _is_number(before) and not _is_number(after):
            continue
        ratio = _get(summary, "compressed", f"{key}_ratio")
        if _is_number(ratio):
            change = _num(pointer("compressed", f"{key}_ratio"), ratio, "ratio")
        elif _is_number(before) and _is_number(after) and before:
            change = f'<td class="num">{after / before:.3f}×</td>'
        else:
            change = "<td></td>"
        rows.append(f"<th>{title}</th>{_num(pointer('original', key), before)}"
                    f"{_num(pointer('compressed', key), after)}{change}")
    return _table(["", "original", "compressed", "ratio"], rows, "costs") if rows else ""


def _per_class_section(summary: Mapping[str, Any], labelled: bool) -> str:
    per_class = summary.get("per_class")
    if not isinstance(per_class, Mapping) or not per_class:
        if not labelled:
            return f'<h3>Per class</h3><p class="needs-labels">Per-class accuracy {_NEEDS_LABELS}.</p>'
        return ""
    columns = [(which, part) for which in per_class for part in ("val", "test")
               if isinstance(_get(per_class, which, part), list)]
    if not columns:
        return ""
    count = max(len(per_class[w][p]) for w, p in columns)
    headers = ["class"] + [f"{w} {'val.' if p == 'val' else 'test'}" for w, p in columns]
    rows = []
    for index in range(count):
        cells = []
        for which, part in columns:
            values = per_class[which][part]
            value = values[index] if index < len(values) else None
            cells.append(_num(pointer("per_class", which, part, index), value, "pct"))
        rows.append(f"<th>{index}</th>" + "".join(cells))
    return "<h3>Per class</h3>" + _table(headers, rows, "per-class")


def _latency_section(summary: Mapping[str, Any]) -> str:
    """``latency_ms`` for the original and compressed model at each batch size, where the run measured it."""
    found: dict[str, tuple[str, Mapping[str, Any]]] = {}
    top = summary.get("latency_ms")
    if isinstance(top, Mapping):
        for side, per_batch in top.items():
            if isinstance(per_batch, Mapping):
                found[str(side)] = (pointer("latency_ms", side), per_batch)
    for side in ("original", "compressed"):
        per_batch = _get(summary, side, "latency_ms")
        if isinstance(per_batch, Mapping) and side not in found:
            found[side] = (pointer(side, "latency_ms"), per_batch)
    if not found:
        return ""
    batches = sorted({str(b) for _, per_batch in found.values() for b in per_batch},
                     key=lambda b: (not b.isdigit(), int(b) if b.isdigit() else 0, b))
    sides = list(found)
    with_fastest = any(isinstance(v, Mapping) and "fastest" in v for _, per_batch in found.values()
                       for v in per_batch.values())
    headers = ["batch"] + [f"{side} median ({'p90; fastest call' if with_fastest else 'p90'})" for side in sides]
    if {"original", "compressed"} <= set(sides):
        headers.append("compressed / original")
    rows = []
    for batch in batches:
        cells, medians = [], {}
        for side in sides:
            base, per_batch = found[side]
            value = per_batch.get(batch)
            if isinstance(value, Mapping):
                median, p90, fastest = value.get("median"), value.get("p90"), value.get("fastest")
                key = pointer(*base.split("/")[1:], batch, "median")
                shown = [_fmt(v, "ms") for v in (p90, fastest) if _is_number(v)]
                extra = f' <span class="muted">({"; ".join(shown)})</span>' if shown else ""
                cell = _num(key, median, "ms")
                cells.append(cell[:-5] + extra + "</td>" if extra else cell)
                medians[side] = median
            else:
                cells.append(_num(pointer(*base.split("/")[1:], batch), value, "ms"))
                medians[side] = value
        if len(headers) > len(sides) + 1:
            o, c = medians.get("original"), medians.get("compressed")
            cells.append(f'<td class="num">{c / o:.3f}×</td>' if _is_number(o) and _is_number(c) and o else "<td></td>")
        rows.append(f"<th>{_esc(batch)}</th>" + "".join(cells))
    return "<h3>Latency</h3>" + _table(headers, rows, "latency")


_DEPLOYMENT_KEYS = ("deployment", "variants", "int8")


def _flatten(row: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    items: list[tuple[tuple[str, ...], Any]] = []
    for key, value in row.items():
        if isinstance(value, Mapping) and len(prefix) < 2:
            items += _flatten(value, (*prefix, str(key)))
        elif not isinstance(value, (list, dict)):
            items.append(((*prefix, str(key)), value))
    return items


def _deployment_section(summary: Mapping[str, Any]) -> str:
    """Rows for original / low-rank / int8 / low-rank+int8 (file bytes, metric on ONNX Runtime, latency), if any."""
    for key in _DEPLOYMENT_KEYS:
        table = summary.get(key)
        if isinstance(table, Mapping) and table and all(isinstance(v, Mapping) for v in table.values()):
            rows_in = [(str(name), pointer(key, name), value) for name, value in table.items()]
        elif isinstance(table, list) and table and all(isinstance(v, Mapping) for v in table):
            rows_in = [(str(v.get("name", v.get("model", v.get("variant", i)))), pointer(key, i), v)
                       for i, v in enumerate(table)]
        else:
            continue
        columns: list[tuple[str, ...]] = []
        for _, _, row in rows_in:
            for path, _ in _flatten(row):
                if path not in columns and path[-1] not in ("name", "model", "variant"):
                    columns.append(path)
        rows = []
        for name, base, row in rows_in:
            values = dict(_flatten(row))
            cells = []
            for path in columns:
                value = values.get(path)
                style = "ms" if any("ms" in p or "latency" in p for p in path) else (
                    "pct" if any(w in path[-1] for w in ("accuracy", "agreement", "metric")) else "auto")
                if _is_number(value):
                    cells.append(_num(base + pointer(*path), value, style))
                else:
                    cells.append(f"<td>{_esc('' if value is None else value)}</td>")
            rows.append(f"<th>{_esc(name)}</th>" + "".join(cells))
        title = "Deployed variants (ONNX Runtime)"
        return f"<h3>{title}</h3>" + _table(["model"] + [" ".join(p).replace("_", " ") for p in columns], rows,
                                             "deployment")
    return ""


def _target_text(summary: Mapping[str, Any], kind: str) -> str:
    if kind != "compress":
        return {"apply": "a plan applied", "finetune": "recovery fine-tuning"}[kind]
    if summary.get("mode") == "tolerance":
        smallest = {"macs": "MACs", "params": "parameters"}.get(str(summary.get("minimize")), summary.get("minimize"))
        return (f"tolerance {_fmt(summary.get('tolerance'), 'pct')} of {summary.get('metric')} "
                f"(validation), smallest {smallest}")
    from .search.config import budget_text

    return budget_text(summary.get("budget") or {})


def _interval_text(summary: Mapping[str, Any]) -> str:
    """The paired bootstrap interval of the drop (``drop_ci``), when the run computed one."""
    intervals = summary.get("drop_ci")
    if not isinstance(intervals, Mapping):
        return ""
    shown = []
    for split in ("validation", "test"):
        bounds = intervals.get(split)
        if isinstance(bounds, list) and len(bounds) == 2 and all(_is_number(b) for b in bounds):
            shown.append(f"{split} [{_num(pointer('drop_ci', split, 0), bounds[0], 'pct', tag='span', cls='num')}, "
                         f"{_num(pointer('drop_ci', split, 1), bounds[1], 'pct', tag='span', cls='num')}]")
    if not shown:
        return ""
    level = summary.get("confidence")
    judged = (f"; the tolerance applied to its upper end ({_fmt(level, 'pct')} confidence)"
              if _is_number(level) else "")
    return (f"<p>Drop, 95% paired bootstrap interval (same samples, original vs compressed): {', '.join(shown)}"
            f"{judged}.</p>")


def summary_section(summary: Mapping[str, Any], kind: str) -> str:
    labelled = kind == "apply" or _has_labels(summary, kind)
    parts = ["<section id=\"summary\"><h2>Summary</h2>", f"<p class=\"lead\">{_esc(_target_text(summary, kind))}"]
    if kind == "compress" and _is_number(summary.get("drop")):
        parts.append(f" · drop {_num('/drop', summary['drop'], 'pct', tag='span', cls='num')}")
    if kind == "compress":
        parts.append(f" · {_num('/evaluations', summary.get('evaluations'), tag='span', cls='num')} evaluations run, "
                     f"{_num('/evaluations_cached', summary.get('evaluations_cached'), tag='span', cls='num')}"
                     " from the cache")
    parts.append("</p>")
    parts.append(_interval_text(summary))
    parts.append(_accuracy_table(summary, kind))
    costs = _cost_table(summary)
    parts.append(costs or "<p class=\"missing\">Sizes not recorded: this run had no example input to count "
                          "parameters and MACs with (pass --data or --input-shape).</p>")
    if not labelled:
        parts.append(f"<p class=\"needs-labels\">Accuracy {_NEEDS_LABELS}.</p>")
    if kind != "apply":
        parts.append(_per_class_section(summary, labelled))
    parts.append(_latency_section(summary))
    parts.append(_deployment_section(summary))
    tuned = summary.get("finetune")
    if isinstance(tuned, Mapping):
        parts.append("<h3>Recovery fine-tuning</h3><p>")
        parts.append(f"{_num('/finetune/epochs_run', tuned.get('epochs_run'), tag='span', cls='num')} epoch(s)"
                     f"{' with distillation' if tuned.get('distilled') else ''}; validation accuracy "
                     f"{_num('/finetune/val_before', tuned.get('val_before'), 'pct', tag='span', cls='num')} → "
                     f"{_num('/finetune/val_after', tuned.get('val_after'), 'pct', tag='span', cls='num')}, "
                     f"test accuracy "
                     f"{_num('/finetune/test_before', tuned.get('test_before'), 'pct', tag='span', cls='num')} → "
                     f"{_num('/finetune/test_after', tuned.get('test_after'), 'pct', tag='span', cls='num')}.</p>")
    notes = summary.get("notes")
    if isinstance(notes, list) and notes:
        parts.append("<h3>Notes</h3><ul>" + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>")
    parts.append("</section>")
    return "".join(parts)


def _plan_layers(summary: Mapping[str, Any]) -> dict[str, Any]:
    plan = summary.get("plan")
    layers = plan.get("layers") if isinstance(plan, Mapping) else None
    return dict(layers) if isinstance(layers, Mapping) else {}


def _dense_reason(summary: Mapping[str, Any], kind: str, row: Mapping[str, Any]) -> str:
    """Why a searched layer stayed dense, from what the run recorded."""
    name = str(row.get("name"))
    for key in ("reason", "kept_dense"):
        if isinstance(row.get(key), str):
            return row[key]
    for note in summary.get("notes") or []:
        if isinstance(note, str) and note.startswith(f"{name}: "):
            return note[len(name) + 2:]
    if kind != "compress":
        return "not in the plan"
    by = "macs" if summary.get("minimize") == "macs" else "params"
    spectrum = _get(summary, "spectra", name) or {}
    caps = [v.get(by) for v in (spectrum.get("break_even") or {}).values() if isinstance(v, Mapping)]
    if caps and all(isinstance(c, int) and c < 1 for c in caps):
        return f"no factorization has fewer {by} than the dense layer (every break-even rank is below 1)"
    probe = _get(summary, "probes", name)
    if isinstance(probe, Mapping) and probe.get("evaluated") and probe.get("threshold") is None:
        return "even its best factorization breaks the tolerance on its own"
    if summary.get("mode") == "budget":
        return "the budget was met with less accuracy lost by compressing the other layers"
    return "compressing it as well would have broken the tolerance, or saved less than the layers compressed"


def _break_even_text(summary: Mapping[str, Any], name: str, method: str | None) -> tuple[str, str | None, Any]:
    """(text, JSON pointer, value) of the break-even rank shown for a layer."""
    by = "macs" if summary.get("minimize", "macs") == "macs" else "params"
    table = _get(summary, "spectra", name, "break_even")
    if isinstance(table, Mapping):
        if method in table and _is_number(_get(table, method, by)):
            return "", pointer("spectra", name, "break_even", method, by), table[method][by]
        listed = [f"{m} {_get(table, m, by)}" for m in table if _is_number(_get(table, m, by))]
        return " · ".join(listed), None, None
    return "", None, None


def _layer_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-layer rows: compress's ``layers``, else the compressed model's counted layers (apply, finetune)."""
    rows = []
    source: list[Any] = []
    base: tuple[str, ...] = ()
    if isinstance(summary.get("layers"), list):
        source, base = summary["layers"], ("layers",)
    elif isinstance(_get(summary, "compressed", "layers"), list):
        source, base = summary["compressed"]["layers"], ("compressed", "layers")
    for index, row in enumerate(source):
        if isinstance(row, Mapping) and isinstance(row.get("name"), str):
            rows.append({**row, "method": row.get("method") or "dense", "_path": (*base, index)})
    if not rows:  # no counts: the plan's entries and the layers whose spectra were recorded
        plan = _plan_layers(summary)
        spectra = _mapping(summary.get("spectra"))
        for name in list(spectra) + [n for n in plan if n not in spectra]:
            entry = _mapping(plan.get(name))
            rows.append({"name": name, "type": _get(spectra, name, "type") or "",
                         "method": entry.get("method", "dense"), "rank": entry.get("rank"), "_path": None})
    return rows


def layers_section(summary: Mapping[str, Any], kind: str) -> str:
    rows_in = _layer_rows(summary)
    total_params = _get(summary, "compressed", "params")
    total_macs = _get(summary, "compressed", "macs")
    headers = ["layer", "type", "method", "rank", "break-even rank", "params", "MACs", "share of params",
               "share of MACs", "kept dense because"]
    rows, shown = [], set()
    for row in rows_in:
        name, method, path = row["name"], row["method"], row["_path"]
        shown.add(name)
        be_text, be_key, be_value = _break_even_text(summary, name, method)
        be_cell = _num(be_key, be_value) if be_key else f"<td>{_esc(be_text)}</td>"
        cells = []
        for key in ("params", "macs"):
            cells.append(_num(pointer(*path, key) if path else None, row.get(key)))
        for key, total in (("params", total_params), ("macs", total_macs)):
            value = row.get(key)
            share = f"{value / total:.1%}" if _is_number(value) and _is_number(total) and total else ""
            cells.append(f'<td class="num">{share}</td>')
        reason = _dense_reason(summary, kind, row) if method == "dense" else ""
        rows.append(f"<th>{_esc(name)}</th><td>{_esc(row.get('type', ''))}</td><td>{_esc(method)}</td>"
                    f"<td>{_esc(_rank_text(row.get('rank')))}</td>{be_cell}{''.join(cells)}<td>{_esc(reason)}</td>")
    for skipped in summary.get("skipped_layers") or []:
        if isinstance(skipped, Mapping) and skipped.get("name") not in shown:
            rows.append(f"<th>{_esc(skipped.get('name'))}</th><td></td><td>dense</td><td></td><td></td><td></td>"
                        f"<td></td><td></td><td></td><td>{_esc(skipped.get('reason', 'cannot be factorized'))}</td>")
    if not rows:
        return ('<section id="layers"><h2>Layers</h2><p class="missing">Not recorded: this run holds no per-layer '
                "table.</p></section>")
    by = "MACs" if summary.get("minimize", "macs") == "macs" else "parameters"
    note = ("<p class=\"muted\">Break-even rank: the largest rank at which the method's factorization still has "
            f"fewer {by} than the dense layer; shares are of the compressed model.</p>")
    return f'<section id="layers"><h2>Layers</h2>{note}{_table(headers, rows, "layers")}</section>'


def spectra_section(plt, summary: Mapping[str, Any]) -> str:
    spectra = summary.get("spectra")
    head = '<section id="spectra"><h2>Singular-value spectra</h2>'
    if not isinstance(spectra, Mapping) or not spectra:
        return (head + '<p class="missing">Not recorded: spectra need the original weights, which this run did not '
                "have (e.g. finetune of a saved compressed model).</p></section>")
    if plt is None:
        return head + _NO_PLOTS + "</section>"
    figures = []
    for name, entry in spectra.items():
        if not isinstance(entry, Mapping):
            continue
        uri = spectrum_plot(plt, name, entry)
        if uri is None:
            continue
        method, chosen = entry.get("chosen_method"), entry.get("chosen_rank")
        plan_rank = _rank_text(_get(_plan_layers(summary), name, "rank"))
        if method in (None, "dense"):
            caption = "kept dense"
        elif _is_number(chosen):
            caption = f"{_esc(method)} rank {_esc(plan_rank or chosen)} (marked)"
        else:
            caption = (f"{_esc(method)} rank {_esc(plan_rank)}: a rank of another factorization, not of this "
                       "matrix (not marked)")
        be = entry.get("spectrum_break_even")
        caption += f"; break-even rank of this matrix {_esc(be)}"
        figures.append(_figure(uri, f"singular values of {name}", f"<b>{_esc(name)}</b>: {caption}", "spectrum",
                               len(entry.get("singular_values") or [])))
    intro = ("<p class=\"muted\">Each layer's weight as an (out, in·k…) matrix: σᵢ/σ₁ on a log scale. Dotted: the "
             "break-even rank of its truncated SVD, r(m+n) &lt; mn; red: the rank the chosen factorization keeps "
             "(shaded: what it drops).</p>")
    return head + intro + '<div class="grid">' + "".join(figures) + "</div></section>"


_NO_PLOTS = ('<p class="missing">Plots need matplotlib, which is not installed: pip install '
             "'rankshrink[report]' and run 'rankshrink report DIR' again.</p>")


def _probe_points(summary: Mapping[str, Any]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """layer -> method -> [(rank, metric)] from the single-layer probe records."""
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for record in summary.get("records") or []:
        if not isinstance(record, Mapping) or not str(record.get("phase", "")).startswith("probe"):
            continue
        plan = record.get("plan")
        if not isinstance(plan, Mapping) or len(plan) != 1 or not _is_number(record.get("value")):
            continue
        (name, entry), = plan.items()
        if not isinstance(entry, Mapping):
            continue
        rank = entry.get("rank")
        x = rank[0] if isinstance(rank, list) and rank else rank
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            label = str(entry.get("method")) + (" (R_out)" if isinstance(rank, list) else "")
            curves.setdefault(name, {}).setdefault(label, []).append((float(x), float(record["value"])))
    return curves


def curves_section(plt, summary: Mapping[str, Any], kind: str) -> str:
    head = '<section id="curves"><h2>Metric vs rank, per layer</h2>'
    curves = _probe_points(summary)
    if not curves:
        why = ("this run did not probe single layers (budget searches and the default tolerance search order "
               "layers by the distortion proxy and measure whole models; with --tolerance, pass --sensitivity "
               "probe to measure one-layer curves)" if kind == "compress"
               else f"only compress searches ranks; this is {_a(kind)} run")
        return head + f'<p class="missing">Not recorded: {why}.</p></section>'
    if plt is None:
        return head + _NO_PLOTS + "</section>"
    metric = str(summary.get("metric") or "metric")
    baseline = _get(summary, "original", "metric")
    baseline = baseline if _is_number(baseline) else None
    tolerance = summary.get("tolerance")
    floor = baseline - tolerance if baseline is not None and _is_number(tolerance) else None
    figures = []
    for name, series in curves.items():
        uri = curve_plot(plt, name, series, baseline, floor, metric)
        count = sum(len(points) for points in series.values())
        figures.append(_figure(uri, f"{metric} against rank for {name}",
                               f"<b>{_esc(name)}</b>: {count} probe evaluation(s)", "curve", count))
    intro = ("<p class=\"muted\">Validation metric with only this layer factorized, at the ranks the search probed; "
             "dashed: the original; dotted: the lowest value the tolerance allows.</p>")
    return head + intro + '<div class="grid">' + "".join(figures) + "</div></section>"


def _same_plan(record_plan: Any, plan_layers: Mapping[str, Any]) -> bool:
    if not isinstance(record_plan, Mapping):
        return False
    return json.dumps(record_plan, sort_keys=True) == json.dumps(dict(plan_layers), sort_keys=True)


def tradeoff_section(plt, summary: Mapping[str, Any], kind: str) -> str:
    head = '<section id="tradeoff"><h2>Metric vs MACs of every evaluated plan</h2>'
    records = [r for r in summary.get("records") or [] if isinstance(r, Mapping)
               and _is_number(r.get("macs")) and _is_number(r.get("value"))]
    if not records:
        why = ("its evaluation records carry no MACs" if summary.get("records") else
               f"only compress evaluates plans; this is {_a(kind)} run")
        return head + f'<p class="missing">Not recorded: {why}.</p></section>'
    if plt is None:
        return head + _NO_PLOTS + "</section>"
    plan_layers = _plan_layers(summary)
    chosen_record = next((r for r in reversed(records) if plan_layers and _same_plan(r.get("plan"), plan_layers)),
                         None)
    if chosen_record is None:  # no plan.json: the record with the chosen model's cost and value
        target = (_get(summary, "compressed", "macs"), summary.get("plan_value", _get(summary, "compressed", "metric")))
        chosen_record = next((r for r in reversed(records) if (r["macs"], r["value"]) == target), None)
    original_record = next((r for r in records if r.get("plan") == {}), None)
    points = [(float(r["macs"]), float(r["value"])) for r in records]
    chosen = (float(chosen_record["macs"]), float(chosen_record["value"])) if chosen_record else None
    original = (float(original_record["macs"]), float(original_record["value"])) if original_record else None
    metric = str(summary.get("metric") or "metric")
    baseline, tolerance = _get(summary, "original", "metric"), summary.get("tolerance")
    floor = baseline - tolerance if _is_number(baseline) and _is_number(tolerance) else None
    uri = tradeoff_plot(plt, points, chosen, original, metric, floor)
    front = pareto_front(points)
    caption = f"{len(points)} evaluated plans, {len(front)} on the Pareto front (orange)"
    if chosen_record is not None:
        at = summary["records"].index(chosen_record)
        caption += (f"; the chosen plan (red star) is evaluation "
                    f"{_num(pointer('records', at, 'index'), chosen_record.get('index'), tag='span', cls='num')} at "
                    f"{_num(pointer('records', at, 'macs'), chosen_record['macs'], tag='span', cls='num')} MACs, "
                    f"{_num(pointer('records', at, 'value'), chosen_record['value'], 'pct', tag='span', cls='num')}")
    figure = _figure(uri, f"{metric} against MACs", caption, "tradeoff", len(points))
    return head + f'<div class="wide">{figure}</div></section>'


def run_section(summary: Mapping[str, Any], kind: str) -> str:
    run = _mapping(summary.get("run"))
    items: list[tuple[str, str]] = []

    def add(title: str, value: Any, path: str | None = None, code: bool = False) -> None:
        if value is None or value == "":
            return
        text = _esc(value if not isinstance(value, (dict, list)) else json.dumps(value))
        text = f"<code>{text}</code>" if code else text
        key = f' data-key="{_esc(path)}" data-value="{_esc(json.dumps(value))}"' if path else ""
        items.append((title, f"<dd{key}>{text}</dd>"))

    add("command", run.get("command"), "/run/command", code=True)
    add("model", run.get("model", summary.get("model")))
    add("weights", run.get("weights", summary.get("weights")))
    add("weights sha256", run.get("weights_sha256"), code=True)
    add("data", run.get("data", summary.get("data")))
    add("data fingerprint (sha256)", run.get("data_fingerprint"), "/run/data_fingerprint", code=True)
    sizes = run.get("data_sizes")
    if isinstance(sizes, Mapping):
        add("data split sizes", " / ".join(f"{k} {v}" for k, v in sizes.items()))
    seed = run.get("seed", summary.get("seed"))
    add("seed", seed, "/run/seed" if "seed" in run else ("/seed" if "seed" in summary else None))
    add("factor fit", summary.get("fit"))
    versions = run.get("versions")
    if isinstance(versions, Mapping):
        add("versions", ", ".join(f"{k} {v}" for k, v in versions.items()))
    add("platform", run.get("platform"))
    add("threads", run.get("threads"))
    add("finished", run.get("finished"))
    add("search time", f"{summary['search_seconds']} s" if _is_number(summary.get("search_seconds")) else None)
    if not items:
        return ('<section id="run"><h2>How this run was made</h2><p class="missing">Not recorded.</p></section>')
    body = "".join(f"<dt>{_esc(title)}</dt>{value}" for title, value in items)
    return f'<section id="run"><h2>How this run was made</h2><dl>{body}</dl></section>'


_CSS = """
:root{--fg:#1b1f24;--muted:#5b6470;--line:#d8dde3;--bg:#fff;--band:#f5f7f9;--accent:#1f5fa8;--warn:#9a3412}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:var(--fg);
 background:var(--bg)}
main{max-width:1100px;margin:0 auto;padding:16px}
h1{font-size:1.5rem;margin:.2em 0}
h2{font-size:1.2rem;margin:1.6em 0 .5em;padding-top:.6em;border-top:1px solid var(--line)}
h3{font-size:1rem;margin:1.2em 0 .4em}
nav{display:flex;flex-wrap:wrap;gap:.3em 1em;font-size:.9rem}
nav a{color:var(--accent);text-decoration:none}
.lead{font-size:1rem}
.muted,figcaption{color:var(--muted);font-size:.85rem}
.missing,.needs-labels{color:var(--warn);font-size:.9rem}
td.needs-labels{font-style:italic}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;max-width:100%}
table{border-collapse:collapse;font-size:.85rem;margin:.3em 0}
th,td{padding:.3em .6em;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
thead th{background:var(--band);position:sticky;top:0}
tbody th{font-weight:600;white-space:nowrap}
td.num,span.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px}
figure{margin:0;padding:8px;border:1px solid var(--line);border-radius:6px;background:#fff}
figure img{display:block;width:100%;height:auto}
.wide figure{max-width:820px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.3em 1em;font-size:.9rem}
dt{color:var(--muted)}
dd{margin:0;overflow-wrap:anywhere}
code{font:.85em ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;overflow-wrap:anywhere}
@media (max-width:600px){
 main{padding:10px}
 body{font-size:14px}
 .grid{grid-template-columns:1fr}
 dl{grid-template-columns:1fr}
 dt{margin-top:.4em}
 th,td{padding:.25em .35em}
 tbody th{white-space:normal}
 table{font-size:.8rem}
}
"""


def render_html(summary: Mapping[str, Any], *, title: str | None = None) -> str:
    """The report page for ``summary`` (as :func:`load_run` returns it)."""
    kind = summary_kind(summary)
    if kind is None:
        raise FileFormatError("not the summary of a compress, apply or finetune run.")
    plt = _pyplot()
    model = _get(summary, "run", "model") or summary.get("model") or "model"
    heading = title or f"rankshrink {kind}: {model}"
    sections = [summary_section(summary, kind), layers_section(summary, kind), spectra_section(plt, summary),
                curves_section(plt, summary, kind), tradeoff_section(plt, summary, kind), run_section(summary, kind)]
    nav = "".join(f'<a href="#{anchor}">{text}</a>' for anchor, text in (
        ("summary", "Summary"), ("layers", "Layers"), ("spectra", "Spectra"), ("curves", "Metric vs rank"),
        ("tradeoff", "Metric vs MACs"), ("run", "How it was made")))
    from ._version import __version__

    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_esc(heading)}</title><style>{_CSS}</style></head><body><main>"
            f"<header><h1>{_esc(heading)}</h1><nav>{nav}</nav></header>{''.join(sections)}"
            f"<footer><p class=\"muted\">Written by rankshrink {_esc(__version__)} from summary.json; regenerate "
            "with <code>rankshrink report DIR</code>.</p></footer></main></body></html>\n")


def write_html_report(directory: str | os.PathLike, *, out: str | os.PathLike | None = None) -> Path:
    """Read the run in ``directory`` and write its report (default ``directory/report.html``) atomically."""
    from .files import atomic_write_text

    summary = load_run(directory)
    target = Path(out) if out is not None else Path(directory) / REPORT_FILE
    atomic_write_text(target, render_html(summary))
    return target
