"""What a run records in summary.json so that ``report.html`` can be drawn from the directory alone.

The HTML report (:mod:`rankshrink.html_report`) reads nothing but the run directory, so the
commands add these keys to the summaries they write (existing keys are left as they are):

* ``spectra``: per factorizable layer of the original model, the singular values of its weight
  as an (out, in·k…) matrix, that matrix's break-even rank, each method's break-even ranks (by
  params and by MACs), and ``chosen_rank``: the rank the chosen factorization leaves that matrix
  with, when it is a truncation of it (``Method.spectrum_rank``).
* ``skipped_layers``: layers the cost count saw but that cannot be factorized, with the reason.
* ``per_class``: accuracy per class on the validation and test splits, of the original and the
  compressed model (absent when the data has no labels).
* ``run``: how the run was made: the command line, package versions, seed, data SPEC and the
  data's content fingerprint, the model SPEC and the sha256 of its weights file, the time.
* ``params``/``macs``/``bytes`` of every evaluation record (``records``) whose plan lacks them.
"""

from __future__ import annotations

import datetime as _dt
import math
import platform
import shlex
from typing import Any, Iterable, Mapping, MutableMapping, Sequence

import torch
from torch import nn

from .errors import DataError, RankshrinkError

_SIGNIFICANT = 6  # digits kept of each singular value (the plots need far fewer; JSON stays small)


def _round(value: float) -> float:
    if not math.isfinite(value) or value == 0.0:
        return float(value)
    return float(f"{value:.{_SIGNIFICANT}g}")


def layer_spectra(model: nn.Module, example_input: Any) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """(``spectra``, ``skipped_layers``) of ``model``'s dense factorizable layers (see the module notes)."""
    from .analysis import analyze

    analysis = analyze(model, example_input)
    spectra = {}
    for layer in analysis.layers:
        spectra[layer.name] = {
            "type": layer.type, "weight_shape": list(layer.weight_shape), "params": layer.params, "macs": layer.macs,
            "matrix": [layer.weight_shape[0], math.prod(layer.weight_shape[1:])],
            "singular_values": [_round(v) for v in layer.singular_values],
            "spectrum_break_even": layer.spectrum_break_even, "break_even": layer.break_even,
            "rank_for_energy": layer.rank_for_energy}
    skipped = [{"name": name, "reason": reason} for name, reason in analysis.skipped]
    return spectra, skipped


def mark_chosen(spectra: MutableMapping[str, Any], plan: Mapping[str, Any]) -> None:
    """Set each spectrum's ``chosen_method``/``chosen_rank`` from ``plan`` (a plan's ``layers`` mapping)."""
    from .methods import get_method

    for name, entry in spectra.items():
        chosen = plan.get(name)
        if not isinstance(chosen, Mapping) or "method" not in chosen:
            entry.update(chosen_method="dense", chosen_rank=None)
            continue
        method = get_method(chosen["method"])
        rank = chosen.get("rank")
        rank = tuple(rank) if isinstance(rank, list) else rank
        entry.update(chosen_method=method.name, chosen_rank=method.spectrum_rank(rank))


def per_class(models: Mapping[str, nn.Module], splits: Any) -> dict[str, dict[str, list[float | None]]] | None:
    """Per-class accuracy of each model on ``splits.val`` and ``splits.test``; None without labels."""
    from .metrics import per_class_accuracy

    num_classes = getattr(splits, "num_classes", None)
    result: dict[str, dict[str, list[float | None]]] = {}
    for which, model in models.items():
        result[which] = {}
        for part in ("val", "test"):
            dataset = getattr(splits, part, None)
            if dataset is None:
                continue
            try:
                values = per_class_accuracy(model, dataset, num_classes=num_classes)
            except DataError:  # no usable labels: the report marks the section as needing them
                return None
            result[which][part] = [None if math.isnan(v) else v for v in values]
    return result


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def run_info(*, argv: Sequence[str] | None, seed: Any = None, data_spec: str | None = None, splits: Any = None,
             model_spec: str | None = None, weights: str | None = None) -> dict[str, Any]:
    """How the run was made (``run`` in summary.json): enough to repeat it."""
    from ._version import __version__

    weights_sha = None
    if weights:
        from .files import file_sha256

        try:
            weights_sha = file_sha256(weights)
        except OSError:  # a directory (a compressed model) or unreadable: the SPEC and data still say a lot
            weights_sha = None
    versions = {"rankshrink": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for package in ("numpy", "tensorly", "safetensors", "scikit-learn", "onnx", "onnxruntime", "matplotlib"):
        found = _version(package)
        if found:
            versions[package] = found
    command = None if argv is None else "rankshrink " + shlex.join(list(argv))
    return {"command": command, "versions": versions, "seed": seed, "model": model_spec, "weights": weights,
            "weights_sha256": weights_sha, "data": data_spec,
            "data_fingerprint": getattr(splits, "fingerprint", None),
            "data_sizes": {part: len(getattr(splits, part)) for part in ("train", "val", "test")
                           if getattr(splits, part, None) is not None} if splits is not None else None,
            "platform": f"{platform.system()} {platform.machine()}",
            "threads": torch.get_num_threads(),
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def add_record_costs(records: Iterable[MutableMapping[str, Any]], model: nn.Module, example_input: Any) -> None:
    """Give every evaluation record without them its plan's ``params``, ``macs`` and ``bytes``.

    The same formulas as the search's cost model: the original's totals, with each planned
    layer's dense cost replaced by its factorization's (MACs times the layer's calls).
    """
    from .cost import count, dense_cost, factorized_cost
    from .methods import get_method

    records = [r for r in records if not all(k in r for k in ("params", "macs", "bytes"))]
    if not records:
        return
    costs = count(model, example_input)
    rows = {row.name: row for row in costs.layers if row.method is None}
    for record in records:
        total = {"params": costs.params, "macs": costs.macs, "bytes": costs.bytes}
        plan = record.get("plan") or {}
        layers = plan.get("layers", {}) if isinstance(plan, Mapping) and "format" in plan else plan
        try:
            for name, entry in layers.items():
                row = rows[name]
                method = get_method(entry["method"])
                rank = method.normalize_rank(row.geometry, entry["rank"], layer=name)
                dense = dense_cost(row.geometry, row.input_size)
                small = factorized_cost(row.geometry, method.name, rank, row.input_size)
                element = row.bytes // max(row.params, 1) if row.params else 4
                total["params"] += small.params - dense.params
                total["macs"] += (small.macs - dense.macs) * row.calls
                total["bytes"] += (small.params - dense.params) * element
        except (KeyError, TypeError, RankshrinkError):  # a record of another model: leave it without costs
            continue
        record.update(total)


def enrich_summary(summary: MutableMapping[str, Any], *, original: nn.Module | None, compressed: nn.Module | None,
                   plan: Mapping[str, Any] | None, example_input: Any = None, splits: Any = None,
                   argv: Sequence[str] | None = None, data_spec: str | None = None, model_spec: str | None = None,
                   weights: str | None = None, seed: Any = None, measure: bool = True) -> MutableMapping[str, Any]:
    """Add the report's keys (see the module notes) to ``summary``; keys already there are kept.

    ``measure`` False skips the per-class accuracies (``apply`` measures no accuracy).
    """
    if example_input is None and splits is not None:
        from .data import first_batch
        from .inputs import to_model

        reference = original if original is not None else compressed
        example_input = first_batch(splits.val)[0]
        if reference is not None:
            example_input = to_model(example_input, reference)
    if original is not None and example_input is not None:
        spectra, skipped = layer_spectra(original, example_input)
        mark_chosen(spectra, plan or {})
        summary.setdefault("spectra", spectra)
        summary.setdefault("skipped_layers", skipped)
        if isinstance(summary.get("records"), list):
            add_record_costs(summary["records"], original, example_input)
    if measure and splits is not None and "per_class" not in summary:
        models = {k: m for k, m in (("original", original), ("compressed", compressed)) if m is not None}
        if models:
            found = per_class(models, splits)
            if found is not None:
                summary["per_class"] = found
    summary.setdefault("run", run_info(argv=argv, seed=seed, data_spec=data_spec, splits=splits,
                                       model_spec=model_spec, weights=weights))
    return summary
