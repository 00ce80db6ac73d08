"""Benchmark: data-aware (activation-optimal) factorization vs plain SVD, and recovery fine-tuning.

Questions, one run (a few minutes on 2 CPU cores, one intra-op thread by default):

1. **Per layer** — for every factorizable layer of the digits CNN and of the seeds'
   CIFAR-shaped CNN (trained on the built-in synthetic CIFAR-shaped data): the relative
   activation error ``‖Y − Y′‖_F / ‖Y‖_F`` of that layer's output on *held-out*
   (validation) inputs, and the test accuracy of the model with only that layer
   factorized, against rank, for ``fit='weights'`` (plain SVD/CP of the weights)
   and ``fit='activations'`` (calibrated on 512 training samples; with and
   without the bias correction that puts ``(W − W′)·mean`` into the bias).
2. **Damping** — the relative ridge on the statistics, on the digits CNN's first
   fully connected layer.
3. **Whole network** — ``rankshrink.compress(..., tolerance=0.01)`` (at most one
   accuracy point below the original on validation) with each objective: the MAC
   ratio reached; then the combined workflow ``compress_and_recover`` (search at a
   looser 3-point tolerance, 3 epochs of fine-tuning with distillation, verify against
   the 1-point tolerance, tighten and retry if it fails): the MAC ratio reached with
   fine-tuning, and accuracy before compression, after factorization and after
   fine-tuning.

Writes ``benchmarks/results/data_aware.json`` and ``data_aware.md``.
Usage: ``python benchmarks/data_aware.py [--threads N] [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import rankshrink as rs  # noqa: E402
from provenance import provenance, provenance_line  # noqa: E402
from rankshrink import search  # noqa: E402
from rankshrink.calibration import CalibrationWarning, calibrate  # noqa: E402
from rankshrink.factorized import layer_geometry  # noqa: E402
from rankshrink.files import atomic_write_json, atomic_write_text  # noqa: E402
from rankshrink.layers import factorizable_layers  # noqa: E402
from rankshrink.methods import full_rank, methods_for  # noqa: E402
from rankshrink.metrics import accuracy  # noqa: E402
from rankshrink.models import load_builtin  # noqa: E402
from rankshrink.workflow import compress_and_recover  # noqa: E402

MODELS = ("digits-cnn", "cifar-cnn")
CONV_METHODS = ("weight", "spatial", "cp")
TOLERANCE = 0.01
SEARCH_TOLERANCE = 0.03
EPOCHS = 3


def affine_error(layer, block, stats) -> float:
    """‖(Wx + b) − (W′x + b′)‖ / ‖Wx + b‖ summed over the vectors ``stats`` summarises."""
    W = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
    Wp = block.dense_weight().double().reshape(W.shape)
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(W.shape[0], dtype=torch.float64)
    bp = block.bias.detach().double() if block.bias is not None else torch.zeros_like(b)
    C, mu, n = stats.second_moment(), stats.input_mean(), stats.count

    def energy(M, c):
        return float(((M @ C) * M).sum() + 2 * n * (c @ (M @ mu)) + n * (c @ c))

    return max(energy(W - Wp, b - bp), 0.0) ** 0.5 / max(energy(W, b), 1e-300) ** 0.5


def ranks_for(top: int) -> list[int]:
    ranks = [r for r in (1, 2, 4, 8, 16, 32, 64) if r < top]
    return ranks + [top] if top <= 64 else ranks


def per_layer(name: str, model, splits, cal, held_out, quick: bool) -> list[dict]:
    rows = []
    for layer_name, layer in factorizable_layers(model):
        geometry = layer_geometry(layer)
        methods = [m for m in methods_for(geometry) if m in (("svd",) + CONV_METHODS)]
        if quick:
            methods = methods[:1]
        for method in methods:
            top = full_rank(geometry, method)
            for rank in ranks_for(top)[: 3 if quick else None]:
                row = {"model": name, "layer": layer_name, "method": method, "rank": rank, "full_rank": top}
                for label, options in (("weights", {"fit": "weights"}),
                                       ("activations", {"fit": "activations"}),
                                       ("activations_no_bias", {"fit": "activations", "bias_correction": False})):
                    config = rs.methods.make_config(method, rank, **options)
                    block = rs.factorize(layer, config, input_stats=cal[layer_name])
                    small = rs.apply(model, rs.Plan.from_mapping({layer_name: config}), calibration=cal)
                    row[label] = {"error": affine_error(layer, block, held_out[layer_name]),
                                  "test_accuracy": accuracy(small, splits.test)}
                rows.append(row)
                print(f"  {name} {layer_name} {method} r={rank}: error {row['weights']['error']:.3f} -> "
                      f"{row['activations']['error']:.3f}, test acc {row['weights']['test_accuracy']:.3f} -> "
                      f"{row['activations']['test_accuracy']:.3f}", flush=True)
    return rows


def damping_study(model, splits, cal, held_out) -> list[dict]:
    layer = model.get_submodule("classifier.1")
    out = []
    for damping in (0.0, 1e-3, 1e-2, 1e-1, 1.0, 10.0):
        config = rs.SVDConfig(rank=8, fit="activations", damping=damping)
        block = rs.factorize(layer, config, input_stats=cal["classifier.1"])
        small = rs.apply(model, rs.Plan.from_mapping({"classifier.1": config}), calibration=cal)
        out.append({"damping": damping, "error": affine_error(layer, block, held_out["classifier.1"]),
                    "test_accuracy": accuracy(small, splits.test), "val_accuracy": accuracy(small, splits.val)})
    return out


def whole_network(name: str, model, splits, cache: Path) -> dict:
    result = {"baseline": {"val": accuracy(model, splits.val), "test": accuracy(model, splits.test)}}
    for objective in ("weights", "activations"):
        start = time.perf_counter()
        found = search.compress(model, splits, tolerance=TOLERANCE, fit=objective, progress=False,
                                cache=cache / f"{name}-{objective}")
        small = found.compressed_model()
        entry = {"search": {"macs_ratio": found.ratio("macs"), "params_ratio": found.ratio("params"),
                            "val": accuracy(small, splits.val), "test": accuracy(small, splits.test),
                            "evaluations": found.evaluations, "plan": found.plan.to_dict()["layers"],
                            "seconds": time.perf_counter() - start}}
        start = time.perf_counter()
        recovered = compress_and_recover(model, splits, tolerance=TOLERANCE, search_tolerance=SEARCH_TOLERANCE,
                                         epochs=EPOCHS, distill=True, fit=objective, progress=False,
                                         search_options={"cache": cache / f"{name}-{objective}"})
        entry["finetuned"] = {"macs_ratio": recovered.macs_ratio, "params_ratio": recovered.params_ratio,
                              "accuracy": recovered.accuracy, "meets_tolerance": recovered.meets_tolerance,
                              "search_tolerance_used": recovered.search_tolerance,
                              "attempts": [{k: v for k, v in a.items() if k != "plan"} for a in recovered.attempts],
                              "plan": recovered.plan.to_dict()["layers"],
                              "seconds": time.perf_counter() - start}
        result[objective] = entry
        print(f"  {name} {objective}: search MACs {entry['search']['macs_ratio']:.3f}; with fine-tuning "
              f"{recovered.macs_ratio:.3f} ({recovered.accuracy['finetuned']['val']:.3f} val)", flush=True)
    result["macs_ratio_activations_over_weights"] = {
        "search": result["activations"]["search"]["macs_ratio"] / result["weights"]["search"]["macs_ratio"],
        "finetuned": result["activations"]["finetuned"]["macs_ratio"] / result["weights"]["finetuned"]["macs_ratio"],
    }
    return result


# --------------------------------------------------------------------------- report

def pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def markdown(data: dict) -> str:
    lines = ["# Data-aware factorization and recovery fine-tuning", "", provenance_line(data["provenance"]), "",
             f"Machine: {data['machine']}; torch {data['torch']}, {data['threads']} intra-op thread(s); "
             f"total {data['seconds']:.0f} s. Calibration: {data['calibration_samples']} training samples; "
             "errors on validation inputs, accuracy on the test split unless noted.", ""]
    lines += ["## Whole-network search at a tolerance of 1 accuracy point", "",
              f"Search: `rankshrink.compress(model, splits, tolerance={TOLERANCE})`. With fine-tuning: "
              f"`compress_and_recover` searches at {SEARCH_TOLERANCE:g}, fine-tunes the factors for {EPOCHS} "
              "epochs with distillation, and must end within 1 point of the original on validation (else "
              "it tightens the search tolerance and retries).", "",
              "| model | objective | MACs (search) | params (search) | val / test after search | "
              "MACs (search + fine-tune) | val / test: original → factorized → fine-tuned | meets 1 pt | "
              "search tol. used |",
              "|---|---|---:|---:|---|---:|---|---|---:|"]
    for name in MODELS:
        w = data["whole_network"][name]
        for objective in ("weights", "activations"):
            e = w[objective]
            a = e["finetuned"]["accuracy"]
            lines.append(
                f"| {name} | {objective} | {e['search']['macs_ratio']:.3f} | {e['search']['params_ratio']:.3f} | "
                f"{pct(e['search']['val'])} / {pct(e['search']['test'])} | {e['finetuned']['macs_ratio']:.3f} | "
                f"{pct(a['original']['val'])}/{pct(a['original']['test'])} → {pct(a['factorized']['val'])}/"
                f"{pct(a['factorized']['test'])} → {pct(a['finetuned']['val'])}/{pct(a['finetuned']['test'])} | "
                f"{'yes' if e['finetuned']['meets_tolerance'] else 'NO'} | "
                f"{e['finetuned']['search_tolerance_used']:g} |")
    lines += ["", "MAC ratio of the data-aware search to the plain-SVD search (goal ≤ 0.7):", ""]
    for name in MODELS:
        r = data["whole_network"][name]["macs_ratio_activations_over_weights"]
        lines.append(f"- {name}: search only {r['search']:.2f}×; with fine-tuning {r['finetuned']:.2f}×")
    lines += ["", "Plans chosen:", ""]
    for name in MODELS:
        for objective in ("weights", "activations"):
            e = data["whole_network"][name][objective]
            fmt = ", ".join(f"{k} {v['method']} {v['rank']}" for k, v in e["search"]["plan"].items())
            fmt2 = ", ".join(f"{k} {v['method']} {v['rank']}" for k, v in e["finetuned"]["plan"].items())
            lines.append(f"- {name}, {objective}: search: {fmt or 'nothing'}; with fine-tuning: {fmt2 or 'nothing'}")
    lines += ["", "## Per layer: relative activation error and test accuracy vs rank", "",
              "Only the named layer is factorized. *weights*: plain factorization of the weights; *act.*: "
              "activation-optimal (default, with bias correction); *act. no-bias*: activation-optimal without "
              "the bias correction. Error = ‖Y − Y′‖/‖Y‖ of the layer's output (bias included) on validation "
              "inputs.", ""]
    for name in MODELS:
        base = data["whole_network"][name]["baseline"]
        lines += [f"### {name} (test accuracy of the original: {pct(base['test'])}%)", "",
                  "| layer | method | rank | error weights | error act. | error act. no-bias | ratio | "
                  "acc. weights | acc. act. | acc. act. no-bias |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in data["per_layer"][name]:
            w, a, n = row["weights"], row["activations"], row["activations_no_bias"]
            ratio = f"{a['error'] / w['error']:.2f}" if w["error"] > 1e-4 else "—"  # exact at full rank
            lines.append(f"| {row['layer']} | {row['method']} | {row['rank']}/{row['full_rank']} | "
                         f"{w['error']:.3f} | {a['error']:.3f} | {n['error']:.3f} | {ratio} | "
                         f"{pct(w['test_accuracy'])} | {pct(a['test_accuracy'])} | {pct(n['test_accuracy'])} |")
        lines.append("")
    lines += ["## Damping (digits-cnn, classifier.1, svd rank 8)", "",
              "| damping | error | val acc. | test acc. |", "|---:|---:|---:|---:|"]
    for row in data["damping"]:
        lines.append(f"| {row['damping']:g} | {row['error']:.4f} | {pct(row['val_accuracy'])} | "
                     f"{pct(row['test_accuracy'])} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="fewer ranks and methods (a smoke run)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="output directory")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=CalibrationWarning)
    start = time.perf_counter()
    data = {"machine": f"{platform.machine()} with {os.cpu_count()} CPU cores (shared)",
            "torch": torch.__version__, "threads": args.threads, "calibration_samples": 512,
            "per_layer": {}, "whole_network": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            print(f"{name}: loading", flush=True)
            model, splits = load_builtin(name, progress=False)
            cal = calibrate(model, splits.train, samples=512)
            held_out = calibrate(model, splits.val, samples=None)
            data["per_layer"][name] = per_layer(name, model, splits, cal, held_out, args.quick)
            if name == "digits-cnn":
                data["damping"] = damping_study(model, splits, cal, held_out)
            data["whole_network"][name] = whole_network(name, model, splits, Path(tmp))
    data["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    data["provenance"] = provenance()
    atomic_write_json(out / "data_aware.json", data)
    atomic_write_text(out / "data_aware.md", markdown(data))
    print(f"wrote {out / 'data_aware.json'} and {out / 'data_aware.md'} ({data['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
