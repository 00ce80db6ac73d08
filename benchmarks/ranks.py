"""Benchmark: rank selection (rankshrink.search.plan) against three baselines.

Question: how much compression / accuracy does the search reach, with how many
evaluations and how much time, compared with

* **brute force** over a per-layer grid (every combination of {dense, and a few MAC
  ratios per layer}: 5^L combinations on the digits CNN, 4^L on the CIFAR CNN), the
  best answer that grid allows, at a huge evaluation count;
* **uniform**: one MAC ratio shared by every layer (bisected for a tolerance, the
  largest that fits for a budget);
* **AIMET-style greedy** (AIMET's greedy compression-ratio selection): every layer
  alone at N = 9 MAC ratios (0.1 … 0.9) is evaluated (L·9 evaluations), then one
  global accuracy threshold picks, per layer, the smallest ratio that keeps its
  single-layer accuracy above the threshold; the threshold is bisected (by formula,
  no evaluations) to fit the budget, then the model is evaluated once more. It has
  no tolerance mode; for tolerance rows each layer takes its smallest ratio with a
  single-layer drop within δ, which can break δ once the layers are combined.

All methods share the same factorizer (data-aware factors, the search's default), the
same validation split for decisions and the same test split for the report. The
baselines use one method per layer type, as AIMET does: SVD for Linear layers and
spatial SVD for convolutions; the search also chooses the method.

Run: ``python benchmarks/ranks.py`` (a few minutes on 2 cores). Writes
``benchmarks/results/ranks.json`` and ``ranks.md``. ``--cifar-dir DIR`` uses real
CIFAR-10 instead of the synthetic CIFAR-shaped set; ``--quick`` skips brute force.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import torch

from rankshrink.cost import factorized_cost
from rankshrink.data import load_data
from rankshrink.methods import full_rank, normalize_rank
from rankshrink.metrics import accuracy
from rankshrink.models import load_builtin
from rankshrink.plan import Plan
from rankshrink.search import SearchConfig, compress
from rankshrink.search.evaluate import single_threaded
from rankshrink.search.session import Session
from rankshrink.search.space import CostModel

RESULTS = Path(__file__).resolve().parent / "results"
TOLERANCES = (0.005, 0.01)
MAC_BUDGETS = (0.5, 0.3, 0.2)
GREEDY_RATIOS = tuple(round(0.1 * i, 1) for i in range(1, 10))


# --------------------------------------------------------------------------- shared helpers

class Bench:
    """One model + data: the session (factorizer, metric, counters) and exact costs."""

    def __init__(self, name: str, model, splits):
        self.name, self.model, self.splits = name, model, splits
        self.session = Session(model, splits, SearchConfig(cache=False, progress=False))
        self.cost = CostModel(model, self.session.example_input)
        self.original = self.cost.original
        self.rows = [r for r in self.cost.model_cost.layers if r.method is None]
        self.method = {r.name: ("svd" if r.type == "Linear" else "spatial") for r in self.rows}
        self.values: dict[str, float] = {}
        self.evaluations = 0   # distinct models evaluated
        self.requests = 0      # evaluations asked for (a repeat is answered from memory but still counted)
        self.baseline = self.evaluate(Plan())

    def evaluate(self, plan: Plan) -> float:
        self.requests += 1
        key = plan.key()
        if key not in self.values:
            self.values[key] = accuracy(self.session.factorizer.build(plan), self.splits.val)
            self.evaluations += 1
        return self.values[key]

    def rank_for_ratio(self, row, ratio: float):
        """The largest rank whose MACs are at most ``ratio`` of the dense layer's (None: dense)."""
        method = self.method[row.name]
        dense = row.macs
        best = None
        for r in range(1, full_rank(row.geometry, method) + 1):
            if factorized_cost(row.geometry, method, r, row.input_size).macs * row.calls <= ratio * dense:
                best = r
            else:
                break
        return best

    def plan_for(self, ratios: dict[str, float | None]) -> Plan:
        layers = {}
        for row in self.rows:
            ratio = ratios.get(row.name)
            if ratio is None or ratio >= 1:
                continue
            rank = self.rank_for_ratio(row, ratio)
            if rank is not None:
                layers[row.name] = self.session.factorizer.config(self.method[row.name], rank)  # data-aware
        return Plan.from_mapping(layers)

    def costs(self, plan: Plan) -> dict[str, int]:
        result = dict(self.original)
        by_name = {r.name: r for r in self.rows}
        for name, entry in plan.items():
            row = by_name[name]
            fc = factorized_cost(row.geometry, entry.method, normalize_rank(row.geometry, entry.method, entry.rank),
                                 row.input_size)
            esize = self.model.get_submodule(name).weight.element_size()
            result["params"] += fc.params - row.params
            result["macs"] += fc.macs * row.calls - row.macs
            result["bytes"] += (fc.params - row.params) * esize
        return result

    def row(self, method: str, setting: str, plan: Plan, evaluations: int, seconds: float, *, value=None,
            tolerance=None) -> dict:
        value = self.evaluate(plan) if value is None else value
        costs = self.costs(plan)
        test = accuracy(self.session.factorizer.build(plan), self.splits.test)
        ok = None if tolerance is None else (self.baseline - value <= tolerance + 1e-9)
        return {"model": self.name, "setting": setting, "method": method, "val_accuracy": value,
                "drop": self.baseline - value, "test_accuracy": test,
                "macs_ratio": costs["macs"] / self.original["macs"],
                "params_ratio": costs["params"] / self.original["params"], "evaluations": evaluations,
                "seconds": round(seconds, 2), "tolerance_met": ok,
                "plan": {n: e.to_json() for n, e in plan.items()}}


# --------------------------------------------------------------------------- baselines

def uniform(b: Bench, *, tolerance=None, budget=None) -> tuple[Plan, int]:
    start = b.evaluations
    grid = [i / 32 for i in range(1, 32)]
    plans = [b.plan_for({r.name: q for r in b.rows}) for q in grid]
    if budget is not None:
        fits = [p for p in plans if b.costs(p)["macs"] <= budget * b.original["macs"]]
        best = max(fits, key=lambda p: b.costs(p)["macs"]) if fits else Plan()
        b.evaluate(best)
        return best, b.evaluations - start
    lo, hi = -1, len(grid)  # grid index: larger ratio = more accurate; find the smallest passing
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if b.baseline - b.evaluate(plans[mid]) <= tolerance + 1e-9:
            hi = mid
        else:
            lo = mid
    return (plans[hi] if hi < len(grid) else Plan()), b.evaluations - start


def greedy(b: Bench, *, tolerance=None, budget=None, scores=None) -> tuple[Plan, int, dict]:
    start = b.evaluations
    if scores is None:
        scores = {r.name: {q: b.evaluate(b.plan_for({r.name: q})) for q in GREEDY_RATIOS} for r in b.rows}

    def layer_macs(row, q):
        return b.costs(b.plan_for({row.name: q}))["macs"]

    def pick(threshold: float) -> Plan:
        # Per layer, the cheapest ratio whose single-layer score meets the threshold (dense if none).
        ratios = {}
        for r in b.rows:
            ok = [q for q in GREEDY_RATIOS if scores[r.name][q] >= threshold - 1e-12]
            ratios[r.name] = min(ok, key=lambda q: (layer_macs(r, q), q)) if ok else None
        return b.plan_for(ratios)

    if tolerance is not None:
        chosen = pick(b.baseline - tolerance)
    else:
        levels = sorted({v for s in scores.values() for v in s.values()} | {b.baseline + 1})
        # Highest threshold whose plan fits the budget (AIMET bisects the same monotone map).
        chosen = None
        for level in reversed(levels):
            candidate = pick(level)
            if b.costs(candidate)["macs"] <= budget * b.original["macs"]:
                chosen = candidate
                break
        chosen = chosen or pick(-1.0)
    b.evaluate(chosen)
    return chosen, b.evaluations - start, scores


def brute(b: Bench, levels) -> dict:
    """Evaluate every combination of per-layer levels once; answers come from this table."""
    start, t0 = b.evaluations, time.perf_counter()
    table = []
    for combo in itertools.product(levels, repeat=len(b.rows)):
        plan = b.plan_for({r.name: q for r, q in zip(b.rows, combo)})
        table.append((plan, b.evaluate(plan), b.costs(plan)["macs"]))
    return {"table": table, "evaluations": b.evaluations - start, "seconds": time.perf_counter() - t0}


def brute_answer(b: Bench, table, *, tolerance=None, budget=None) -> Plan:
    if tolerance is not None:
        ok = [t for t in table if b.baseline - t[1] <= tolerance + 1e-9]
        return min(ok, key=lambda t: (t[2], -t[1]))[0]
    ok = [t for t in table if t[2] <= budget * b.original["macs"]]
    return max(ok, key=lambda t: (t[1], -t[2]))[0] if ok else Plan()


# --------------------------------------------------------------------------- driver

def run_model(name: str, model, splits, *, levels, quick: bool) -> list[dict]:
    rows = []
    b = Bench(name, model, splits)
    print(f"[{name}] baseline val {b.baseline:.4f}; layers {[r.name for r in b.rows]}", file=sys.stderr)
    settings = [("tolerance", t) for t in TOLERANCES] + [("budget", m) for m in MAC_BUDGETS]
    table = None
    if not quick:
        table = brute(b, levels)
        print(f"[{name}] brute force: {table['evaluations']} evaluations, {table['seconds']:.1f} s", file=sys.stderr)
    scores = None
    greedy_first = None
    for kind, value in settings:
        setting = f"tolerance {value:g}" if kind == "tolerance" else f"MACs <= {value:g}"
        kw = {"tolerance": value} if kind == "tolerance" else {"budget": {"macs": value}}
        for sensitivity in ("proxy", "probe"):
            if kind == "budget" and sensitivity == "probe":
                continue
            t0 = time.perf_counter()
            result = compress(model, splits, sensitivity=sensitivity, cache=False, progress=False, **kw)
            seconds = time.perf_counter() - t0
            rows.append(b.row(f"search ({sensitivity})", setting, result.plan, result.requested, seconds,
                              value=result.value, tolerance=kw.get("tolerance")))
        base_kw = {"tolerance": value} if kind == "tolerance" else {"budget": value}
        t0 = time.perf_counter()
        before = b.requests
        plan_u, _ = uniform(b, **base_kw)
        rows.append(b.row("uniform", setting, plan_u, b.requests - before, time.perf_counter() - t0,
                          tolerance=kw.get("tolerance")))
        t0 = time.perf_counter()
        before = b.evaluations
        plan_g, _, scores = greedy(b, scores=scores, **base_kw)
        used = b.evaluations - before
        if greedy_first is None:
            greedy_first = used  # the L·9 per-layer scores are paid once; count them in every row
        greedy_row = b.row("AIMET-style greedy", setting, plan_g, greedy_first + 1 if used < greedy_first else used,
                           time.perf_counter() - t0, tolerance=kw.get("tolerance"))
        rows.append(greedy_row)
        # Accuracy per MAC at equal MACs: the search's budget mode at exactly the greedy's MACs.
        t0 = time.perf_counter()
        at = compress(model, splits, budget={"macs": greedy_row["macs_ratio"]}, cache=False, progress=False)
        rows.append(b.row("search at greedy's MACs", setting, at.plan, at.requested, time.perf_counter() - t0,
                          value=at.value))
        if table is not None:
            plan_b = brute_answer(b, table["table"], **base_kw)
            rows.append(b.row("brute force (grid)", setting, plan_b, table["evaluations"], table["seconds"],
                              tolerance=kw.get("tolerance")))
        print(f"[{name}] {setting}: " + "; ".join(f"{r['method']} acc {r['val_accuracy']:.3f} macs "
                                                 f"{r['macs_ratio']:.3f} evals {r['evaluations']}"
                                                 for r in rows if r["setting"] == setting and r["model"] == name),
              file=sys.stderr)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    out = ["# Rank selection benchmark", "",
           f"Machine: {meta['machine']}; torch {meta['torch']}; one thread; wall time {meta['seconds']:.0f} s "
           "for the whole benchmark.", "",
           "Accuracy is top-1 on the validation split (where tolerances are enforced) and on the separate test "
           "split (reported only). `MACs` and `params` are the compressed model's share of the original's. "
           "`evals` counts metric evaluations of a model on the validation split (the original's included). "
           "Brute force evaluates every grid combination once and answers all settings from that table; the "
           "greedy baseline's L·9 per-layer evaluations are likewise paid once and counted in each of its rows.",
           ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        first = next(r for r in rows if r["model"] == model)
        out += [f"## {model}", "", f"Original validation accuracy {first['val_accuracy'] + first['drop']:.4f}.", "",
                "| setting | method | val acc | drop | test acc | MACs | params | evals | time (s) | tolerance met |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["model"] != model:
                continue
            met = "" if r["tolerance_met"] is None else ("yes" if r["tolerance_met"] else "**no**")
            out.append(f"| {r['setting']} | {r['method']} | {r['val_accuracy']:.4f} | {r['drop']:+.4f} | "
                       f"{r['test_accuracy']:.4f} | {r['macs_ratio']:.3f} | {r['params_ratio']:.3f} | "
                       f"{r['evaluations']} | {r['seconds']:.1f} | {met} |")
        out.append("")
    out += ["## Search vs AIMET-style greedy", "",
            "Tolerance rows compare the search's default (probe) with the greedy; `at equal MACs` runs the "
            "search's budget mode at exactly the MACs the greedy reached, so the accuracies compare at equal "
            "cost.", "",
            "| model | setting | search: val acc / MACs / evals | greedy: val acc / MACs / evals | "
            "search at greedy's MACs: val acc / evals | verdict |",
            "|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        for setting in dict.fromkeys(r["setting"] for r in rows if r["model"] == model):
            pick = lambda m, model=model, setting=setting: next(
                r for r in rows if r["model"] == model and r["setting"] == setting and r["method"] == m)
            tolerance = setting.startswith("tolerance")
            ours = pick("search (probe)" if tolerance else "search (proxy)")
            them = pick("AIMET-style greedy")
            equal = pick("search at greedy's MACs")
            gain = equal["val_accuracy"] - them["val_accuracy"]
            parts = []
            if tolerance and not them["tolerance_met"]:
                parts.append("greedy breaks the tolerance")
            if tolerance and them["tolerance_met"] and ours["macs_ratio"] < them["macs_ratio"]:
                parts.append(f"search {ours['macs_ratio'] / them['macs_ratio']:.2f}x the greedy's MACs")
            if not tolerance:
                diff = ours["val_accuracy"] - them["val_accuracy"]
                parts.append(f"at the budget: {'+' if diff >= 0 else ''}{100 * diff:.1f} points")
            parts.append(f"at equal MACs: {'+' if gain >= 0 else ''}{100 * gain:.1f} points")
            out.append(f"| {model} | {setting} | {ours['val_accuracy']:.4f} / {ours['macs_ratio']:.3f} / "
                       f"{ours['evaluations']} | {them['val_accuracy']:.4f} / {them['macs_ratio']:.3f} / "
                       f"{them['evaluations']} | {equal['val_accuracy']:.4f} / {equal['evaluations']} | "
                       f"{'; '.join(parts)} |")
    out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar-dir", help="real CIFAR-10 (python batches) instead of synthetic:cifar")
    parser.add_argument("--quick", action="store_true", help="skip brute force")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = []
    with single_threaded():
        model, splits = load_builtin("digits-cnn", progress=False)
        rows += run_model("digits CNN (builtin:digits)", model, splits, levels=(None, 0.1, 0.25, 0.5, 0.75),
                          quick=args.quick)
        data = load_data(f"cifar10:{args.cifar_dir}") if args.cifar_dir else None
        model, splits = load_builtin("cifar-cnn", data=data, progress=False)
        rows += run_model(f"seeds' CIFAR CNN ({splits.name})", model, splits, levels=(None, 0.1, 0.25, 0.5),
                          quick=args.quick)
    meta = {"machine": f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} torch threads "
                       "available", "torch": torch.__version__, "seconds": time.perf_counter() - start,
            "python": platform.python_version()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ranks.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (out / "ranks.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
