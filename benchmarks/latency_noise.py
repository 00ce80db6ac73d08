"""Benchmark: how much a plan's latency ratio moves on this shared machine, by medians and by fastest calls.

For each model, the plan ``rankshrink.search.compress(..., budget={'macs': B}, latency=True)``
returns and the original are exported to ONNX and timed in pairs, interleaved, again and again for
``--seconds`` per model and batch size, each time as the search times whole plans
(``deploy.latency.time_rounds``: 3 runs, bursts, the median of the runs). Each time gives two
ratios of plan to original: of the medians and of the fastest calls. Reported per model and batch:
their 10th-90th percentile, interquartile range, and how often each was above
``rankshrink.search.latency.FASTER`` (0.97, the line a plan must be under to count as faster), with
the original's median time, which shows how busy the machine was. A decision the search makes once
should not depend on when it was made: the statistic whose ratio moves less decides.

Run: ``python benchmarks/latency_noise.py`` (about 8 minutes; nothing else should run meanwhile).
Writes ``benchmarks/results/latency_noise.json`` and ``latency_noise.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from provenance import provenance, provenance_line  # noqa: E402
from rankshrink.deploy.latency import first_sample, repeat_to_batch, time_rounds  # noqa: E402
from rankshrink.deploy.onnx import onnx_bytes, onnx_feed, ort_session, require_onnxruntime  # noqa: E402
from rankshrink.files import atomic_write_json, atomic_write_text  # noqa: E402
from rankshrink.models import load_builtin  # noqa: E402
from rankshrink.search import compress  # noqa: E402
from rankshrink.search.evaluate import single_threaded  # noqa: E402
from rankshrink.search.latency import FASTER, PLAN_ROUNDS  # noqa: E402

PLANS = {"ds-cnn": 0.25, "cifar-cnn": 0.5, "wide-mlp": 0.5}   # model -> --max-macs of the plan timed
BATCHES = (1, 32)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))]


def spread(values: list[float]) -> dict:
    return {"p10": _quantile(values, 0.1), "p90": _quantile(values, 0.9),
            "iqr": _quantile(values, 0.75) - _quantile(values, 0.25), "above_faster": sum(v > FASTER for v in values),
            "min": min(values), "max": max(values)}


def bench_model(name: str, macs: float, seconds: float) -> dict:
    with single_threaded():
        model, splits = load_builtin(name, progress=False)
    plan = compress(model, splits, budget={"macs": macs}, latency=True, batches=BATCHES, progress=False)
    sample = first_sample(splits.val.tensors[0][:1])
    ort = require_onnxruntime()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sessions = [ort_session(ort, onnx_bytes(m, sample), 1) for m in (model, plan.model)]
    record: dict = {"model": name, "budget": {"macs": macs}, "layers": len(plan.plan), "by_batch": {}}
    for batch in BATCHES:
        feeds = {batch: [onnx_feed(repeat_to_batch(sample, batch))] * 2}
        medians, fastest, original_ms = [], [], []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            original, compressed = (t[batch] for t in time_rounds(sessions, feeds, rounds=PLAN_ROUNDS, runs=30,
                                                                   warmup=5, min_ms=60.0, max_runs=1000))
            medians.append(compressed.median_ms / original.median_ms)
            fastest.append(compressed.fastest_ms / original.fastest_ms)
            original_ms.append(original.median_ms)
        record["by_batch"][str(batch)] = {"times": len(medians), "original_median_ms": spread(original_ms),
                                          "median_ratio": spread(medians), "fastest_call_ratio": spread(fastest),
                                          "median_ratios": medians, "fastest_call_ratios": fastest}
        print(f"  {name} b{batch}: {len(medians)} times", flush=True)
    return record


def markdown(data: dict) -> str:
    lines = ["# How much a plan's latency ratio moves: medians vs fastest calls", "",
             provenance_line(data["provenance"]), "",
             f"ONNX Runtime CPU execution provider, 1 thread. Each model's `compress --max-macs` plan and the "
             f"original timed in pairs, interleaved, {data['seconds_per_batch']:g} s per batch size, again and "
             f"again, each time as the search times plans (the median of {PLAN_ROUNDS} runs). *Above {FASTER:g}*: "
             "how many times the ratio was over the line a plan must be under to count as faster. "
             f"Command: `{data['command']}`.", "",
             "| model | budget | batch | times | original median ms (p10-p90) | ratio by medians p10-p90 | IQR | "
             f"above {FASTER:g} | by fastest calls p10-p90 | IQR | above {FASTER:g} |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["models"]:
        for batch, b in r["by_batch"].items():
            o, m, f = b["original_median_ms"], b["median_ratio"], b["fastest_call_ratio"]
            lines.append(f"| {r['model']} | macs {r['budget']['macs']:g} | {batch} | {b['times']} | "
                         f"{o['p10']:.4g}-{o['p90']:.4g} | {m['p10']:.2f}-{m['p90']:.2f} | {m['iqr']:.3f} | "
                         f"{m['above_faster']} | {f['p10']:.2f}-{f['p90']:.2f} | {f['iqr']:.3f} | "
                         f"{f['above_faster']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=75.0, help="timing per model and batch size")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="output directory")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    data: dict = {"command": "python benchmarks/latency_noise.py" + "".join(f" {a}" for a in sys.argv[1:]),
                  "seconds_per_batch": args.seconds, "models": []}
    for name, macs in PLANS.items():
        print(f"{name} ...", flush=True)
        data["models"].append(bench_model(name, macs, args.seconds))
    data["provenance"] = provenance()
    out = Path(args.out)
    atomic_write_json(out / "latency_noise.json", data)
    atomic_write_text(out / "latency_noise.md", markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
