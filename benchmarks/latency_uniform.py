"""Benchmark: does a MAC reduction become a latency reduction on ONNX Runtime, and does the latency model predict it?

For every built-in model (the seeds' small ones and the MLPerf Tiny-shaped ones), the
original is compared with two compressed versions made by ``rankshrink.apply`` from
*uniform* plans: every factorizable layer gets the largest rank whose MACs are at most a
shared fraction ρ of its dense MACs, with ρ bisected so the whole model lands at about 0.5
and 0.25 of its MACs (where the uncompressible part, e.g. depthwise convolutions, allows).
The method per layer is fixed by layer shape: SVD for Linear layers, the rank-r 1×1 pair
('weight') for 1×1 convolutions, Tucker-2 for larger kernels. Activation fits (512 calibration
samples; weight fits for layers of more than 2048 inputs), no fine-tuning.

Measured (ONNX Runtime, CPU execution provider, 1 thread): the original and both compressed
models at batch 1 and 32, interleaved in one run; the MAC ratio next to the latency ratio;
the latency model's prediction (``rankshrink.deploy.latency_model``: layers timed alone
against dense, plus the rest of the graph) next to the measurement; how many factorized
layers the latency model measured slower than their dense layer.

This is phase 1 of issue 14 (no latency-aware search yet): it shows the problem the search
will solve and how well the prediction it will use works.

Run: ``python benchmarks/latency_uniform.py`` (a few minutes on 2 cores; the built-ins train on first
use). ``--quick`` measures three models with fewer runs. Writes ``benchmarks/results/latency_uniform.json``
and ``latency_uniform.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch

from provenance import write_results
from rankshrink import Plan, apply, calibrate
from rankshrink.cost import count, dense_cost
from rankshrink.deploy.latency import time_sessions
from rankshrink.deploy.latency_model import LatencyModel, LatencySettings, cpu_model
from rankshrink.deploy.onnx import onnx_bytes, ort_session, require_onnxruntime
from rankshrink.methods import get_method, make_config
from rankshrink.metrics import accuracy
from rankshrink.models import BUILTIN_MODELS, load_builtin

ROOT = Path(__file__).resolve().parents[1]

TARGETS = (0.5, 0.25)
MAX_ACTIVATION_FAN_IN = 2048  # the wide MLP's 8192 inputs: a weight fit (an 8192² eigenproblem takes minutes)
BATCHES = (1, 32)


def method_for(geometry: dict) -> str:
    if geometry["type"] == "Linear":
        return "svd"
    return "weight" if all(k == 1 for k in geometry["kernel_size"]) else "tucker2"


def fan_in(geometry: dict) -> int:
    if geometry["type"] == "Linear":
        return geometry["in_features"]
    return geometry["in_channels"] * math.prod(geometry["kernel_size"])


def largest_rank_within(geometry: dict, input_size, method: str, limit: float):
    """The largest rank whose MACs are at most ``limit`` (None if even rank 1 is above it)."""
    impl = get_method(method)
    lo, hi = 0, impl.full_rank(geometry)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if impl.cost(geometry, impl.normalize_rank(geometry, mid), input_size).macs <= limit:
            lo = mid
        else:
            hi = mid - 1
    return impl.normalize_rank(geometry, lo) if lo else None


def uniform_plan(rows, total_macs: int, rho: float) -> tuple[Plan, int]:
    """Every layer at the largest rank within ``rho`` of its dense MACs; returns the plan and its MACs."""
    entries, macs = {}, total_macs
    for row in rows:
        method = method_for(row.geometry)
        dense = dense_cost(row.geometry, row.input_size).macs * row.calls
        rank = largest_rank_within(row.geometry, row.input_size, method, rho * dense / row.calls)
        if rank is None:  # even rank 1 is above the share: rank 1, the least this layer can cost
            rank = get_method(method).normalize_rank(row.geometry, 1)
        cost = get_method(method).cost(row.geometry, rank, row.input_size).macs * row.calls
        if cost >= dense:
            continue
        # Activation fits where the layer's input statistics are small enough to decompose quickly.
        fit = "activations" if fan_in(row.geometry) <= MAX_ACTIVATION_FAN_IN else "weights"
        entries[row.name] = make_config(method, rank, fit=fit)
        macs += cost - dense
    return Plan.from_mapping(entries), macs


def plan_for_target(rows, total_macs: int, target: float) -> tuple[Plan, float, float]:
    """Bisect the shared per-layer fraction ρ so the model's MAC ratio is as close to ``target`` as it gets."""
    lo, hi = 0.0, 1.0
    best = uniform_plan(rows, total_macs, 1.0)
    best_rho = 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        plan, macs = uniform_plan(rows, total_macs, mid)
        if macs / total_macs <= target:
            best, best_rho, lo = (plan, macs), mid, mid
        else:
            hi = mid
    if best[1] / total_macs > target:  # the target is below what the model allows: take the smallest ρ tried
        best, best_rho = uniform_plan(rows, total_macs, 1e-6), 1e-6
    return best[0], best[1] / total_macs, best_rho


def measure_models(models: dict, sample: torch.Tensor, settings: LatencySettings) -> dict:
    ort = require_onnxruntime()
    names = list(models)
    sessions = [ort_session(ort, onnx_bytes(models[n], sample), settings.threads) for n in names]
    out = {name: {} for name in names}
    for batch in BATCHES:
        feed = {"input": sample.expand(batch, *sample.shape[1:]).contiguous().numpy()}
        for name, latency in zip(names, time_sessions(sessions, [feed] * len(names), runs=settings.runs,
                                                      warmup=settings.warmup, min_ms=settings.min_ms,
                                                      max_runs=settings.max_runs)):
            out[name][batch] = latency
    return out


def bench_model(name: str, settings: LatencySettings, latency_model: LatencyModel) -> dict:
    start = time.perf_counter()
    model, splits = load_builtin(name, progress=False)
    sample = splits.val.tensors[0][:1]
    cost = count(model, sample)
    rows = [row for row in cost.layers if row.method is None]
    small = [row.name for row in rows if fan_in(row.geometry) <= MAX_ACTIVATION_FAN_IN]
    calibration = calibrate(model, splits.train, layers=small, samples=512)
    compressed, plans = {"original": model}, {}
    record = {"model": name, "macs": cost.macs, "params": cost.params, "other_macs": cost.other_multiplies,
              "test_accuracy": accuracy(model, splits.test), "plans": {}}
    for target in TARGETS:
        plan, ratio, rho = plan_for_target(rows, cost.macs, target)
        key = f"{target:g}"
        plans[key] = plan
        compressed[key] = apply(model, plan, calibration=calibration)
        record["plans"][key] = {"target": target, "mac_ratio": ratio, "rho": rho, "layers": len(plan),
                                "plan": plan.to_dict()["layers"],
                                "test_accuracy": accuracy(compressed[key], splits.test)}
    baseline = latency_model.baseline(model, sample)
    measured = measure_models(compressed, sample, settings)
    record["latency_ms"] = {k: {str(b): v[b].median_ms for b in BATCHES} for k, v in measured.items()}
    record["baseline"] = baseline.to_dict()
    for key, plan in plans.items():
        entry = record["plans"][key]
        predicted = latency_model.predict(baseline, plan)
        in_context = latency_model.predict(baseline, plan, context="model")
        entry["latency_ratio"], entry["predicted_ratio"], entry["slower_layers"] = {}, {}, {}
        entry["predicted_in_context_ratio"] = {}
        for batch in BATCHES:
            entry["latency_ratio"][str(batch)] = measured[key][batch].median_ms / measured["original"][batch].median_ms
            entry["predicted_ratio"][str(batch)] = predicted[batch] / baseline.model_ms[batch].median_ms
            entry["predicted_in_context_ratio"][str(batch)] = in_context[batch] / baseline.model_ms[batch].median_ms
        slower = {str(b): [] for b in BATCHES}
        for layer, config in plan.items():
            row = baseline.layers[layer]
            timing = latency_model.measure(row.geometry, row.input_size, config.method, [config.rank], BATCHES)
            for batch, t in next(iter(timing.values())).items():
                if t.ratio > 1.0:
                    slower[str(batch)].append(layer)
        entry["slower_layers"] = slower
    record["seconds"] = time.perf_counter() - start
    return record


def markdown(data: dict) -> str:
    lines = ["# Latency on ONNX Runtime: MAC ratio vs latency ratio, and the latency model's prediction", "",
             f"Commit `{data['commit'][:12]}`, {data['machine']}; onnxruntime {data['versions']['onnxruntime']}, "
             f"torch {data['versions']['torch']}; CPU execution provider, {data['threads']} thread; medians of "
             f"interleaved runs (at least {data['settings']['runs']} runs and {data['settings']['min_ms']:g} ms "
             "per graph). Uniform plans (every layer at the same fraction of its MACs), activation fits, no "
             "fine-tuning. Ratios are compressed / original (below 1 is faster, **bold**: slower); *predicted* is "
             "the latency model (each factorized layer timed alone against its dense layer, plus the rest of the "
             "graph); *in context* is the latency model's in-model mode (each layer factorized alone inside the "
             "whole model, changes added). *Slower layers*: factorized layers timed alone slower than dense.", "",
             "| model | MACs | target | MAC ratio | latency ratio b1 | b32 | predicted b1 | b32 | in context b1 | "
             "b32 | slower layers (b1 / b32) | test acc. orig → compr. |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for record in data["models"]:
        for key, entry in record["plans"].items():
            lr, pr, slow = entry["latency_ratio"], entry["predicted_ratio"], entry["slower_layers"]
            cr = entry["predicted_in_context_ratio"]
            flag = lambda v: f"**{v:.2f}**" if v > 1 else f"{v:.2f}"  # noqa: E731
            lines.append(
                f"| {record['model']} | {record['macs'] / 1e6:.2f} M | {key} | {entry['mac_ratio']:.2f} | "
                f"{flag(lr['1'])} | {flag(lr['32'])} | {pr['1']:.2f} | {pr['32']:.2f} | {cr['1']:.2f} | "
                f"{cr['32']:.2f} | "
                f"{len(slow['1'])} / {len(slow['32'])} of {entry['layers']} | "
                f"{record['test_accuracy']:.3f} → {entry['test_accuracy']:.3f} |")
    def errors_of(field: str, batch: str) -> list[float]:
        return sorted(abs(e[field][batch] / e["latency_ratio"][batch] - 1) for r in data["models"]
                      for e in r["plans"].values() if e["layers"])

    def summary(field: str) -> str:
        parts = []
        for batch in ("1", "32"):
            errors = errors_of(field, batch)
            parts.append(f"batch {batch}: median {errors[len(errors) // 2]:.1%}, largest {errors[-1]:.1%}")
        return "; ".join(parts)

    worse = [(r["model"], k) for r in data["models"] for k, e in r["plans"].items()
             if any(e["latency_ratio"][b] > 1 for b in ("1", "32"))]
    gaps = [(r["model"], k, max(e["latency_ratio"][b] for b in ("1", "32")) / e["mac_ratio"])
            for r in data["models"] if r["macs"] >= 1e6 for k, e in r["plans"].items()]
    lines += ["", f"- Error of the predicted latency ratio, layers timed alone: {summary('predicted_ratio')}.",
              f"- Error of the predicted latency ratio, in context: {summary('predicted_in_context_ratio')}.",
              f"- Compressed models slower than their original at some batch size: {len(worse)} of "
              f"{sum(len(r['plans']) for r in data['models'])} ({', '.join(f'{m} {k}' for m, k in worse) or 'none'}).",
              "- Latency ratio ÷ MAC ratio (worst batch) on models of at least 1 M MACs: "
              + ", ".join(f"{m} {k}: {g:.2f}" for m, k, g in gaps) + ".",
              f"- {data['seconds']:.0f} s in all."]
    return "\n".join(lines) + "\n"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three models, fewer runs (a smoke run)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="output directory")
    parser.add_argument("--models", default=None, help="comma-separated built-ins (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import onnx
    import onnxruntime

    settings = (LatencySettings(runs=5, warmup=1, min_ms=5.0, max_runs=50, batches=BATCHES) if args.quick
                else LatencySettings(runs=30, warmup=5, min_ms=60.0, max_runs=1000, batches=BATCHES))
    # A private latency cache: the benchmark measures every layer afresh instead of reusing the user's.
    names = args.models.split(",") if args.models else (["digits-cnn", "wide-mlp", "ds-cnn"] if args.quick
                                                        else list(BUILTIN_MODELS))
    start = time.perf_counter()
    data = {"commit": _commit(), "machine": f"{cpu_model()}, {os.cpu_count()} cores (shared)",
            "python": platform.python_version(),
            "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__},
            "threads": settings.threads, "batches": list(BATCHES),
            "settings": {"runs": settings.runs, "warmup": settings.warmup, "min_ms": settings.min_ms,
                         "max_runs": settings.max_runs},
            "models": []}
    with tempfile.TemporaryDirectory() as cache:
        latency_model = LatencyModel(settings, cache_dir=cache)
        for name in names:
            print(f"{name} ...", flush=True)
            record = bench_model(name, settings, latency_model)
            data["models"].append(record)
            for key, entry in record["plans"].items():
                print(f"  {key}: MACs {entry['mac_ratio']:.2f}, latency {entry['latency_ratio']}, "
                      f"predicted {entry['predicted_ratio']}", flush=True)
    data["seconds"] = time.perf_counter() - start
    write_results(args.out, "latency_uniform", data, markdown)


if __name__ == "__main__":
    main()
