"""Benchmark: rank selection (rankshrink.compress) against baselines and against the real AIMET.

Question: how much compression / accuracy does the search reach, with how many
evaluations and how much time, compared with

* **the real Qualcomm AIMET 2.42** (aimet-torch): Weight SVD and Spatial SVD with AIMET's
  greedy compression-ratio selection (auto mode, 10 candidate ratios per layer, MACs as the
  cost, validation accuracy as the eval function) at MAC targets 0.5/0.4/0.3/0.2, on the same
  models, weights and splits. rankshrink runs at the same targets and at the MACs AIMET
  actually reached, with AIMET's own methods (``svd,weight``) and with all methods, plain
  (``fit=weights``) and data-aware (``fit=activations``). AIMET runs in its own virtual
  environment (built on first use: ``python -m venv``, ``torch==2.13.0``, then aimet-torch
  2.42 without its torchvision requirement, whose PyPI wheels do not load beside this torch;
  an import-only ``torchvision`` stand-in takes its place) through ``aimet_driver.py``, which
  receives the weights and the data as files and runs in a scratch directory (AIMET writes
  ``./data/``);
* **brute force** over a per-layer grid (every combination of {dense, and a few MAC
  ratios per layer}: 5^L combinations on the digits CNN, 4^L on the CIFAR CNN), the
  best answer that grid allows, at a huge evaluation count;
* **uniform**: one MAC ratio shared by every layer (bisected for a tolerance, the
  largest that fits for a budget);
* **greedy per-layer selection (AIMET-style reimplementation)**: rankshrink's own
  reimplementation of the greedy idea, kept for the tolerance rows the real AIMET has no
  mode for: every layer alone at N = 9 MAC ratios (0.1 … 0.9) is evaluated (L·9
  evaluations), then one global accuracy threshold picks, per layer, the smallest ratio
  that keeps its single-layer accuracy above the threshold; for tolerance rows each layer
  takes its smallest ratio with a single-layer drop within δ, which can break δ once the
  layers are combined.

The baselines of the first table share the search's factorizer (data-aware factors, the
search's default), the same validation split for decisions and the same test split for the
report, and use one method per layer type, as AIMET does: SVD for Linear layers and spatial
SVD for convolutions; the search also chooses the method.

Run: ``python benchmarks/ranks.py`` (about 13 minutes on 2 cores; the first run also builds
AIMET's environment). Writes ``benchmarks/results/ranks.json`` and ``ranks.md``; ``--section own``
runs only the three user models (a BatchNorm CNN, a Conv1d+GRU, a dict-input model) into
``ranks_own.json``/``.md``. ``--cifar-dir DIR`` uses real CIFAR-10 instead of the synthetic
CIFAR-shaped set; ``--quick`` skips brute force; ``--no-aimet`` skips the real AIMET; ``--aimet-venv
DIR`` says where its environment is (default: ``<user cache>/benchmarks/aimet-torch-2.42.0``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import re
import subprocess
import sys
import tempfile
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
GREEDY = "greedy per-layer selection (AIMET-style reimplementation)"


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
        for sensitivity in ("auto", "probe", "proxy"):
            if kind == "budget" and sensitivity != "proxy":  # budget mode always uses the proxy
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
        greedy_row = b.row(GREEDY, setting, plan_g, greedy_first + 1 if used < greedy_first else used,
                           time.perf_counter() - t0, tolerance=kw.get("tolerance"))
        rows.append(greedy_row)
        # Accuracy per MAC at equal MACs: the search's budget mode at exactly the greedy's MACs.
        t0 = time.perf_counter()
        at = compress(model, splits, budget={"macs": greedy_row["macs_ratio"]}, cache=False, progress=False)
        rows.append(b.row("search at the greedy's MACs", setting, at.plan, at.requested, time.perf_counter() - t0,
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


# --------------------------------------------------------------------------- the real AIMET

AIMET_VERSION = "2.42.0"
AIMET_TARGETS = (0.5, 0.4, 0.3, 0.2)
AIMET_SCHEMES = {"weight_svd": "AIMET Weight SVD", "spatial_svd": "AIMET Spatial SVD"}
AIMET_CANDIDATES = 10  # AIMET's default num_comp_ratio_candidates: ratios 0.1 ... 0.9 per layer
RANKSHRINK_CONFIGS = (("svd,weight", "weights"), ("svd,weight", "activations"), ("all", "weights"),
                      ("all", "activations"))
_TORCHVISION_STUB = {
    "__init__.py": '"""Import-only stand-in written by rankshrink\'s benchmark: PyPI\'s torchvision does not load '
                   'beside this torch, and AIMET\'s SVD compression never calls it."""\n'
                   "from . import datasets, ops, transforms  # noqa: F401\n__version__ = \"0+stub\"\n",
    "datasets.py": "",
    "transforms.py": "class Resize:\n    def __init__(self, *args, **kwargs):\n"
                     "        raise NotImplementedError('torchvision stand-in')\n",
    "ops.py": "def _missing(*args, **kwargs):\n    raise NotImplementedError('torchvision stand-in')\n\n\n"
              "roi_align = nms = _missing\n\n\nclass RoIPool:\n    def __init__(self, *args, **kwargs):\n"
              "        raise NotImplementedError('torchvision stand-in')\n",
}


def _run(command: list[str], **kw) -> str:
    done = subprocess.run(command, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def aimet_python(venv: Path) -> Path:
    """The Python of a virtual environment holding aimet-torch 2.42 (built on first use).

    ``python -m venv``; ``pip install torch==2.13.0``; aimet-torch without dependencies; then its
    requirements (extras left out) except torch and torchvision, with torch pinned by a
    constraints file so nothing replaces it; then the torchvision stand-in in site-packages.
    """
    python = venv / "bin" / "python"
    check = ["-c", "import importlib.metadata as m, aimet_torch.compress; print(m.version('aimet-torch'))"]
    if python.exists():
        try:
            if _run([str(python), *check], cwd=tempfile.gettempdir()).strip() == AIMET_VERSION:
                return python
        except RuntimeError:
            pass
    print(f"[aimet] building {venv} (torch 2.13.0 + aimet-torch {AIMET_VERSION})", file=sys.stderr)
    _run([sys.executable, "-m", "venv", "--clear", str(venv)])
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _run(pip + ["torch==2.13.0"])
    _run(pip + ["--no-deps", f"aimet-torch=={AIMET_VERSION}"])
    listing = _run([str(python), "-c", "import importlib.metadata as m; print('\\n'.join(m.requires('aimet-torch')))"])
    wanted = []
    for requirement in listing.splitlines():
        name = re.match(r"[A-Za-z0-9_.-]+", requirement.strip())
        if name and "extra ==" not in requirement and name.group(0).lower() not in ("torch", "torchvision"):
            wanted.append(requirement.split(";")[0].strip())
    constraints = venv / "constraints.txt"
    constraints.write_text("torch==2.13.0\n")
    _run(pip + ["-c", str(constraints), *wanted])
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    (site / "torchvision").mkdir(exist_ok=True)
    for name, text in _TORCHVISION_STUB.items():
        (site / "torchvision" / name).write_text(text)
    version = _run([str(python), *check], cwd=tempfile.gettempdir()).strip()
    if version != AIMET_VERSION:
        raise RuntimeError(f"aimet-torch {version} installed, expected {AIMET_VERSION}")
    return python


def run_aimet(python: Path, model, splits, architecture: str) -> dict:
    """AIMET's Weight SVD and Spatial SVD greedy selection at every target (``aimet_driver.py``)."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="rankshrink-aimet-") as scratch:
        work = Path(scratch)
        weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(work / "weights.safetensors"))
        save_file({"val_x": splits.val.tensors[0].contiguous(), "val_y": splits.val.tensors[1].contiguous(),
                   "test_x": splits.test.tensors[0].contiguous(), "test_y": splits.test.tensors[1].contiguous()},
                  str(work / "data.safetensors"))
        job = {"src": str(Path(__file__).resolve().parents[1] / "src"), "architecture": architecture,
               "input_shape": list(splits.input_shape), "num_classes": splits.num_classes,
               "weights": str(work / "weights.safetensors"), "data": str(work / "data.safetensors"),
               "candidates": AIMET_CANDIDATES,
               "runs": [{"scheme": scheme, "target": t} for scheme in AIMET_SCHEMES for t in AIMET_TARGETS]}
        (work / "job.json").write_text(json.dumps(job))
        done = subprocess.run([str(python), str(Path(__file__).with_name("aimet_driver.py")), "job.json", "out.json"],
                              cwd=work, capture_output=True, text=True)
        for line in done.stderr.splitlines():
            if line.startswith("[aimet]"):
                print(line, file=sys.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"AIMET's driver failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads((work / "out.json").read_text())


def compare_with_aimet(name: str, model, splits, architecture: str, python: Path) -> tuple[list[dict], dict]:
    """AIMET's rows, then rankshrink at the same targets and at AIMET's achieved MACs."""
    answer = run_aimet(python, model, splits, architecture)
    costs = CostModel(model, splits.val.tensors[0][:1]).original
    counted = answer["original"]["macs"]  # FlopCounterMode's count in AIMET's environment
    rows = []
    for run in answer["runs"]:
        rows.append({"model": name, "tool": AIMET_SCHEMES[run["scheme"]], "methods": "", "fit": "weights",
                     "setting": f"target {run['target']:g}", "target": run["target"],
                     "macs": costs["macs"] - (counted - run["macs"]), "macs_ratio": run["macs"] / counted,
                     "val_accuracy": run["val_accuracy"], "test_accuracy": run["test_accuracy"],
                     "evaluations": run["evaluations"], "seconds": round(run["seconds"], 2),
                     "per_layer": run["per_layer"], "layers": run["layers"]})
    points = {}  # achieved MACs -> the AIMET rows that reached them
    for row in rows:
        points.setdefault(row["macs"], []).append(f"{row['tool']} {row['setting']}")
    for methods, fit in RANKSHRINK_CONFIGS:
        chosen = None if methods == "all" else methods.split(",")
        settings = [(f"target {t:g}", {"macs": t}, t) for t in AIMET_TARGETS]
        settings += [(f"at {' = '.join(who)} MACs", {"macs": macs}, None) for macs, who in points.items()]
        for setting, budget, target in settings:
            t0 = time.perf_counter()
            result = compress(model, splits, budget=budget, methods=chosen, fit=fit, cache=False, progress=False)
            seconds = time.perf_counter() - t0
            rows.append({"model": name, "tool": "rankshrink", "methods": methods, "fit": fit, "setting": setting,
                         "target": target, "budget_macs": result.budget["target"], "macs": result.compressed["macs"],
                         "macs_ratio": result.ratio("macs"), "val_accuracy": result.value,
                         "test_accuracy": result.test["compressed"] if result.test else None,
                         "evaluations": result.requested, "seconds": round(seconds, 2),
                         "plan": result.plan.to_dict()["layers"]})
        print(f"[{name}] rankshrink {methods} fit={fit}: " + "; ".join(
            f"{r['setting']}: {r['macs_ratio']:.3f} val {r['val_accuracy']:.4f}" for r in rows
            if r["tool"] == "rankshrink" and r["methods"] == methods and r["fit"] == fit), file=sys.stderr)
    original = {"val_accuracy": answer["original"]["val_accuracy"],
                "test_accuracy": answer["original"]["test_accuracy"],
                "macs": costs["macs"], "macs_flop_counter": counted}
    return rows, original


def aimet_markdown(rows: list[dict], originals: dict) -> list[str]:
    out = ["## The real AIMET 2.42 (aimet-torch) and rankshrink on the same models, weights and splits", "",
           "AIMET: greedy compression-ratio selection (auto mode, 10 candidate ratios per layer, MACs as the cost, "
           "validation accuracy as the eval function), Weight SVD (Linear and Conv2d: two layers of rank r) and "
           "Spatial SVD (Conv2d only: k×1 then 1×k), at MAC targets 0.5/0.4/0.3/0.2. rankshrink: budget mode "
           "(`budget={'macs': ...}`, never over it) at the same targets and at each MAC count AIMET reached, "
           "with AIMET's own methods (`svd,weight`) or all methods, fitting factors to the weights (plain) or "
           "to the activations (data-aware). `MACs` is the share of the original's (AIMET's counted with torch's "
           "FlopCounterMode in its environment, rankshrink's by its cost model; both count the convolutions and "
           "matmuls and agree on the original). `evals`: validation-set evaluations, the original's included "
           "(AIMET: calls of its eval function). Time is the selection's wall time on one thread.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        base = originals[model]
        mine = [r for r in rows if r["model"] == model]
        out += [f"### {model}", "",
                f"Original: validation {base['val_accuracy']:.4f}, test {base['test_accuracy']:.4f}, "
                f"{base['macs']:,} MACs (FlopCounterMode: {base['macs_flop_counter']:,}).", "",
                "| who | methods | fit | setting | MACs | val acc | test acc | evals | time (s) |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in mine:
            out.append(f"| {r['tool']} | {r['methods'] or '-'} | {r['fit'] if r['tool'] == 'rankshrink' else '-'} | "
                       f"{r['setting']} | {r['macs_ratio']:.4f} | {r['val_accuracy']:.4f} | "
                       f"{r['test_accuracy']:.4f} | {r['evaluations']} | {r['seconds']:.1f} |")
        out.append("")
    out += ["### The goal: at AIMET's MACs, strictly more accurate with AIMET's own methods, in no more evaluations",
            "", "Each AIMET result against rankshrink `svd,weight` budget mode at exactly its MACs (validation "
            "accuracy, where both selections decide; test accuracy for reference).", "",
            "| model | AIMET | AIMET MACs / val / test / evals | rankshrink fit | "
            "rankshrink MACs / val / test / evals | met |", "|---|---|---|---|---|---|"]
    verdicts = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        for them in (r for r in rows if r["model"] == model and r["tool"] != "rankshrink"):
            label = f"at {them['tool']} {them['setting']}"
            for fit in ("weights", "activations"):
                ours = next(r for r in rows if r["model"] == model and r["tool"] == "rankshrink"
                            and r["methods"] == "svd,weight" and r["fit"] == fit and r["setting"].startswith("at ")
                            and label[3:] in r["setting"])
                met = ours["val_accuracy"] > them["val_accuracy"] and ours["evaluations"] <= them["evaluations"]
                verdicts.setdefault((model, fit), []).append(met)
                out.append(f"| {model} | {them['tool']} {them['setting']} | {them['macs_ratio']:.4f} / "
                           f"{them['val_accuracy']:.4f} / {them['test_accuracy']:.4f} / {them['evaluations']} | "
                           f"{'plain' if fit == 'weights' else 'data-aware'} | {ours['macs_ratio']:.4f} / "
                           f"{ours['val_accuracy']:.4f} / {ours['test_accuracy']:.4f} / {ours['evaluations']} | "
                           f"{'yes' if met else '**no**'} |")
    out += ["", "Summary: " + "; ".join(
        f"{model}, {'plain' if fit == 'weights' else 'data-aware'}: {sum(v)}/{len(v)} met"
        for (model, fit), v in verdicts.items()), ""]
    return out


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
    out += ["## Search vs the greedy per-layer selection (AIMET-style reimplementation)", "",
            "Tolerance rows compare the search's default (auto) with the reimplemented greedy; `at equal MACs` "
            "runs the search's budget mode at exactly the MACs the greedy reached, so the accuracies compare at "
            "equal cost. (The real AIMET follows in its own section.)", "",
            "| model | setting | search: val acc / MACs / evals | greedy: val acc / MACs / evals | "
            "search at the greedy's MACs: val acc / evals | verdict |",
            "|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        for setting in dict.fromkeys(r["setting"] for r in rows if r["model"] == model):
            pick = lambda m, model=model, setting=setting: next(
                r for r in rows if r["model"] == model and r["setting"] == setting and r["method"] == m)
            tolerance = setting.startswith("tolerance")
            ours = pick("search (auto)" if tolerance else "search (proxy)")
            them = pick(GREEDY)
            equal = pick("search at the greedy's MACs")
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


# --------------------------------------------------------------------------- your own models (issue 10)
#
# A BatchNorm CNN, a Conv1d+GRU keyword spotter and a model taking a dict of inputs, each
# trained here on the digits: the search on models that are not built in, with the MACs it
# reports checked against FlopCounterMode on the compressed model. Kept apart from the
# reference-model table above (its own results files) so either can change alone.

class _BNResNet(torch.nn.Module):
    """BatchNorm, a residual addition, a stride-2, a depthwise and a dilated conv."""

    def __init__(self, width: int = 16):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=2, dilation=2, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width * 16, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        F = torch.nn.functional
        x = self.stem(x)
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        x = F.relu(self.bn3(self.depthwise(F.relu(self.down(x)))))
        return self.head(F.relu(self.fc(x.flatten(1))))


class _KeywordSpotter(torch.nn.Module):
    """The 64 pixels as a 1-D signal: Conv1d padding='same', two strided Conv1d, a GRU."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv1d(1, 32, 5, padding="same")
        self.conv2 = nn.Conv1d(32, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, 3, stride=2, padding=1)
        self.gru = nn.GRU(64, 32, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        F = torch.nn.functional
        h = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x.reshape(len(x), 1, -1)))))))
        out, _ = self.gru(h.transpose(1, 2))
        return self.head(out.mean(1))


class _ImageAndSide(torch.nn.Module):
    """forward(image, side), fed a dict {'image': (N, 1, 8, 8), 'side': (N, 4)}."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.side = nn.Linear(4, 16)
        self.fc = nn.Linear(32 * 16 + 16, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, image, side):
        F = torch.nn.functional
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.bn(self.conv(image))))), 2).flatten(1)
        return self.head(F.relu(self.fc(torch.cat([h, F.relu(self.side(side))], 1))))


def _dict_digits(splits):
    from rankshrink.data import splits_from

    def part(dataset):
        x, y = dataset.tensors
        flat = x.flatten(1)
        side = torch.stack([flat.mean(1), flat.std(1), x[:, 0, 3:5, 3:5].mean((1, 2)), x[:, 0, 0].mean(1)], 1)
        return {"image": x, "side": side}, y

    return splits_from(part(splits.train), part(splits.val), part(splits.test), name="digits + side features")


class _OwnBench(Bench):
    """Bench for models with Conv1d layers: the uniform baseline uses weight SVD there (spatial is 2-D only)."""

    def __init__(self, name, model, splits):
        super().__init__(name, model, splits)
        self.method = {r.name: ("svd" if r.type == "Linear" else "spatial" if r.type == "Conv2d" else "weight")
                       for r in self.rows}


def _flop_counter_macs(model, inputs) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from rankshrink.inputs import batch_size, call_model

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        call_model(model.eval(), inputs)
    return counter.get_total_flops() / 2 / batch_size(inputs)


OWN_TOLERANCES = (0.005, 0.01)
OWN_BUDGETS = (0.7, 0.5, 0.3)


def run_own_models() -> list[dict]:
    """Search and a uniform baseline on the three models a user brings; every budget row's MACs checked."""
    from rankshrink.cost import count
    from rankshrink.data import first_batch, load_digits_splits
    from rankshrink.train import train

    digits = load_digits_splits()
    rows = []
    for name, cls, data, epochs in (("BatchNorm CNN (residual, stride-2, depthwise, dilated)", _BNResNet, digits, 15),
                                    ("Conv1d + GRU keyword spotter", _KeywordSpotter, digits, 20),
                                    ("dict-input model (image + side features)", _ImageAndSide, _dict_digits(digits),
                                     15)):
        torch.manual_seed(0)
        model = cls()
        train(model, data.train, val_data=data.val, epochs=epochs, lr=3e-3, progress=False)
        model.eval()
        example = first_batch(data.val)[0]
        b = _OwnBench(name, model, data)
        original = count(model, example)
        print(f"[{name}] baseline val {b.baseline:.4f}; MACs {original.macs:,} (FlopCounterMode "
              f"{_flop_counter_macs(model, example):,.0f}); not factorized: "
              f"{[(o.name, o.type, o.macs) for o in original.others]}", file=sys.stderr)
        for kind, value in [("tolerance", t) for t in OWN_TOLERANCES] + [("budget", m) for m in OWN_BUDGETS]:
            setting = f"tolerance {value:g}" if kind == "tolerance" else f"MACs <= {value:g}"
            kw = {"tolerance": value} if kind == "tolerance" else {"budget": {"macs": value}}
            t0 = time.perf_counter()
            try:
                result = compress(model, data, cache=False, progress=False, **kw)
            except Exception as exc:  # an unreachable budget is a result too: say why
                rows.append({"model": name, "setting": setting, "method": "search", "infeasible": str(exc)})
                continue
            seconds = time.perf_counter() - t0
            row = b.row("search (probe)" if kind == "tolerance" else "search (proxy)", setting, Plan(),
                        result.requested, seconds, value=result.value, tolerance=kw.get("tolerance"))
            small = result.model  # built from the folded model the search ran on (the bench's own is not folded)
            row.update(test_accuracy=accuracy(small, data.test), macs_ratio=result.ratio("macs"),
                       params_ratio=result.ratio("params"), plan=result.plan.to_dict())
            row["macs_counted"] = count(small, example).macs
            row["macs_flop_counter"] = _flop_counter_macs(small, example)
            row["macs_reported"] = result.compressed["macs"]
            row["folded_batchnorm"] = len(result.plan.fold_batchnorm)
            row["kept_dense"] = {layer["name"]: layer["reason"] for layer in result.layers if layer.get("reason")}
            rows.append(row)
            t0 = time.perf_counter()
            before = b.requests
            plan_u, _ = uniform(b, **({"tolerance": value} if kind == "tolerance" else {"budget": value}))
            row = b.row("uniform", setting, plan_u, b.requests - before, time.perf_counter() - t0,
                        tolerance=kw.get("tolerance"))
            if kind == "budget" and row["macs_ratio"] > value:
                row = {"model": name, "setting": setting, "method": "uniform",
                       "infeasible": "no single MAC ratio for every layer fits the budget"}
            rows.append(row)
            print(f"[{name}] {setting}: " + "; ".join(
                f"{r['method']} acc {r['val_accuracy']:.3f} macs {r['macs_ratio']:.3f} evals {r['evaluations']}"
                for r in rows[-2:] if "val_accuracy" in r), file=sys.stderr)
    return rows


def markdown_own(rows: list[dict], meta: dict) -> str:
    out = ["# Rank selection on your own models", "",
           f"Machine: {meta['machine']}; torch {meta['torch']}; one thread; wall time {meta['seconds']:.0f} s.", "",
           "Three models a user brings, trained here on the digits (`benchmarks/ranks.py --section own`): a "
           "BatchNorm CNN (BatchNorm folded into its convs before the search), a Conv1d + GRU keyword spotter "
           "(the GRU is not factorizable, so it bounds the budgets), and a model taking a dict of inputs. "
           "`MACs` is the compressed model's share of the original's as the search reports it; `counted / "
           "FlopCounterMode` compares `rs.count` of the compressed model with torch's FlopCounterMode (flops/2) "
           "on the same input. The uniform baseline gives every layer one MAC ratio (weight SVD for Conv1d, "
           "spatial SVD for Conv2d, SVD for Linear).", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        first = next((r for r in mine if "val_accuracy" in r), None)
        out += [f"## {model}", ""]
        if first is not None:
            out += [f"Original validation accuracy {first['val_accuracy'] + first['drop']:.4f}.", ""]
        out += ["| setting | method | val acc | drop | test acc | MACs | params | evals | time (s) | tolerance met "
                "| counted / FlopCounterMode | kept dense |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in mine:
            if "infeasible" in r:
                out.append(f"| {r['setting']} | {r['method']} | infeasible: {r['infeasible']} |||||||||||")
                continue
            met = "" if r["tolerance_met"] is None else ("yes" if r["tolerance_met"] else "**no**")
            check = (f"{r['macs_counted']:,} / {r['macs_flop_counter']:,.0f}" if "macs_counted" in r else "")
            kept = ", ".join(f"{n} ({why})" for n, why in r.get("kept_dense", {}).items()
                             if "left out" not in why and "cheaper" not in why)
            out.append(f"| {r['setting']} | {r['method']} | {r['val_accuracy']:.4f} | {r['drop']:+.4f} | "
                       f"{r['test_accuracy']:.4f} | {r['macs_ratio']:.3f} | {r['params_ratio']:.3f} | "
                       f"{r['evaluations']} | {r['seconds']:.1f} | {met} | {check} | {kept} |")
        out.append("")
    return "\n".join(out)


def _meta(start: float) -> dict:
    from rankshrink._version import __version__

    commit = "unknown"
    try:
        import subprocess

        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or commit
    except OSError:
        pass
    return {"machine": f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} torch threads "
                       "available", "torch": torch.__version__, "seconds": time.perf_counter() - start,
            "python": platform.python_version(), "rankshrink": __version__, "commit": commit}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar-dir", help="real CIFAR-10 (python batches) instead of synthetic:cifar")
    parser.add_argument("--quick", action="store_true", help="skip brute force")
    parser.add_argument("--no-aimet", action="store_true", help="skip the real AIMET")
    parser.add_argument("--aimet-venv", help="AIMET's virtual environment (built there on first use)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--section", choices=("all", "reference", "own"), default="all",
                        help="reference: the built-in models (ranks.json/md); own: the three user models "
                             "(ranks_own.json/md); all: both")
    args = parser.parse_args(argv)
    if args.section in ("all", "own"):
        start = time.perf_counter()
        with single_threaded():
            own = run_own_models()
        meta = _meta(start)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ranks_own.json").write_text(json.dumps({"meta": meta, "rows": own}, indent=2) + "\n")
        (out / "ranks_own.md").write_text(markdown_own(own, meta))
        print(markdown_own(own, meta))
        if args.section == "own":
            return 0
    start = time.perf_counter()
    rows: list[dict] = []
    aimet_rows: list[dict] = []
    originals: dict = {}
    python = None
    if not args.no_aimet:
        from rankshrink.files import user_cache_dir

        default = user_cache_dir() / "benchmarks" / f"aimet-torch-{AIMET_VERSION}"
        venv = Path(args.aimet_venv) if args.aimet_venv else default
        python = aimet_python(venv)
    with single_threaded():
        data = load_data(f"cifar10:{args.cifar_dir}") if args.cifar_dir else None
        models = [("digits CNN (builtin:digits)", "digits-cnn", None, "DigitsCNN", (None, 0.1, 0.25, 0.5, 0.75)),
                  ("seeds' CIFAR CNN", "cifar-cnn", data, "CifarCNN", (None, 0.1, 0.25, 0.5))]
        for label, builtin, source, architecture, levels in models:
            model, splits = load_builtin(builtin, data=source, progress=False)
            if builtin == "cifar-cnn":
                label = f"{label} ({splits.name})"
            rows += run_model(label, model, splits, levels=levels, quick=args.quick)
            if python is not None:
                found, original = compare_with_aimet(label, model, splits, architecture, python)
                aimet_rows += found
                originals[label] = original
    meta = {"machine": f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} torch threads "
                       "available", "torch": torch.__version__, "seconds": time.perf_counter() - start,
            "python": platform.python_version(), "commit": _commit(),
            "aimet_torch": None if python is None else AIMET_VERSION}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, meta) + ("\n".join(aimet_markdown(aimet_rows, originals)) if aimet_rows else "")
    (out / "ranks.json").write_text(json.dumps({"meta": meta, "rows": rows, "aimet": {"rows": aimet_rows,
                                                                                     "originals": originals}},
                                               indent=2) + "\n")
    (out / "ranks.md").write_text(text)
    print(text)
    return 0


def _commit() -> str | None:
    try:
        return _run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent).strip()
    except (RuntimeError, OSError):
        return None


if __name__ == "__main__":
    sys.exit(main())
