"""Benchmark: how much a plan's latency ratio moves on this shared machine, by medians and by fastest calls.

For each model, the plan ``rankshrink.search.compress(..., budget={'macs': B}, latency=True)``
returns and the original are exported to ONNX and timed in pairs, interleaved, again and again for
``--seconds`` per model and batch size, each time as the search times whole plans (3 runs of
``deploy.latency.time_sessions``, bursts, as ``time_rounds`` makes them). Each time gives three ratios
of plan to original from the same runs: of the runs' median medians (before this benchmark), of the
runs' median fastest calls (a first try), and of the fastest call of all three runs (what
``time_rounds`` keeps and the search compares). Reported per model and batch: their 10th-90th
percentile, interquartile range, and how often each was above
``rankshrink.search.latency.FASTER`` (0.97, the line a plan must be under to count as faster), with
the original's median time, which shows how busy the machine was. A decision the search makes once
should not depend on when it was made: the statistic whose ratio moves less decides.

Run: ``python benchmarks/latency_noise.py`` (about 8 minutes; nothing else should run meanwhile).
Writes ``benchmarks/results/latency_noise.json`` and ``latency_noise.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from provenance import provenance, provenance_line, write_results  # noqa: E402
from rankshrink.deploy.latency import first_sample, repeat_to_batch, time_sessions  # noqa: E402
from rankshrink.deploy.onnx import onnx_bytes, onnx_feed, ort_session, require_onnxruntime  # noqa: E402
from rankshrink.models import load_builtin  # noqa: E402
from rankshrink.search import compress  # noqa: E402
from rankshrink.search.evaluate import single_threaded  # noqa: E402
from rankshrink.search.latency import FASTER, PLAN_ROUNDS  # noqa: E402

PLANS = {"ds-cnn": 0.25, "cifar-cnn": 0.5, "wide-mlp": 0.5}   # model -> --max-macs of the plan timed
BATCHES = (1, 32)
STATISTICS = {"median_ratio": "medians (median of runs)", "median_fastest_ratio": "fastest calls (median of runs)",
              "fastest_call_ratio": "fastest call of all runs (compared)"}


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
        feeds = [onnx_feed(repeat_to_batch(sample, batch))] * 2
        ratios: dict[str, list[float]] = {key: [] for key in STATISTICS}
        original_ms = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            # As the search times a plan (time_rounds, PLAN_ROUNDS runs), each run kept to compare the statistics.
            runs = [time_sessions(sessions, feeds, runs=30, warmup=5, min_ms=60.0, max_runs=1000)
                    for _ in range(PLAN_ROUNDS)]

            def of(index: int, field: str, combine, runs=runs) -> float:
                return combine(getattr(run[index], field) for run in runs)

            ratios["median_ratio"].append(of(1, "median_ms", statistics.median) / of(0, "median_ms", statistics.median))
            ratios["median_fastest_ratio"].append(of(1, "fastest_ms", statistics.median)
                                                  / of(0, "fastest_ms", statistics.median))
            ratios["fastest_call_ratio"].append(of(1, "fastest_ms", min) / of(0, "fastest_ms", min))
            original_ms.append(of(0, "median_ms", statistics.median))
        record["by_batch"][str(batch)] = {"times": len(original_ms), "original_median_ms": spread(original_ms),
                                          **{key: spread(v) for key, v in ratios.items()},
                                          "ratios": ratios}
        print(f"  {name} b{batch}: {len(original_ms)} times", flush=True)
    return record


def markdown(data: dict) -> str:
    lines = ["# How much a plan's latency ratio moves: medians vs fastest calls", "",
             provenance_line(data["provenance"]), "",
             f"ONNX Runtime CPU execution provider, 1 thread. Each model's `compress --max-macs` plan and the "
             f"original timed in pairs, interleaved, {data['seconds_per_batch']:g} s per batch size, again and "
             f"again, each time as the search times plans ({PLAN_ROUNDS} runs). *Above {FASTER:g}*: "
             "how many times the ratio was over the line a plan must be under to count as faster. "
             f"Command: `{data['command']}`.", "",
             "| model | budget | batch | times | original median ms (p10-p90) | ratio of | p10-p90 | IQR | "
             f"above {FASTER:g} |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["models"]:
        for batch, b in r["by_batch"].items():
            o = b["original_median_ms"]
            for key, label in STATISTICS.items():
                v = b[key]
                lines.append(f"| {r['model']} | macs {r['budget']['macs']:g} | {batch} | {b['times']} | "
                             f"{o['p10']:.4g}-{o['p90']:.4g} | {label} | {v['p10']:.2f}-{v['p90']:.2f} | "
                             f"{v['iqr']:.3f} | {v['above_faster']} |")
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
    write_results(args.out, "latency_noise", data, markdown)


if __name__ == "__main__":
    main()
