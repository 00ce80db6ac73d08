"""Benchmark: LoRA adapters - the seeds' experiment on digits, training cost, inference overhead.

Three questions, one run (a few minutes on 2 CPU cores):

1. **Accuracy** (the seeds' LoRA walkthrough, on data we ship): a base MnistMLP
   (64→128→256→10) is trained on the digits training split, then adapted to a shifted
   domain (every digit transposed) with LoRA at ranks 1, 2, 4, 8 and, for comparison,
   by full fine-tuning. A second setting trains the base on digits 0-4 only and adapts
   it to all ten classes. Reported: accuracy before/after, trainable parameters,
   adapter file size.
2. **Training cost**: one optimizer step (forward, backward, Adam) of LoRA vs full
   fine-tuning on the seeds' 784→128→256→10 MLP and on a 3×(4096→4096) stack; time
   measured side by side (interleaved rounds, median), gradient + optimizer-state bytes
   counted exactly.
3. **Inference**: forward latency of the base, unmerged adapters, merged adapters
   (wrappers kept) and merged-then-removed (plain layers), plus the seeds' naive
   ``LinearWithLoRA`` and Hugging Face PEFT when it is installed - all interleaved in
   one loop so machine noise hits every variant alike; ratios are medians of per-round
   ratios to the base.

Writes ``benchmarks/results/lora.json`` and ``lora.md``.
Usage: ``python benchmarks/lora.py [--threads N] [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import provenance, provenance_line  # noqa: E402
from rankshrink import lora  # noqa: E402
from rankshrink.data import load_digits_splits  # noqa: E402
from rankshrink.files import atomic_write_json, atomic_write_text, save_tensors  # noqa: E402
from rankshrink.metrics import accuracy  # noqa: E402
from rankshrink.models import MnistMLP  # noqa: E402
from rankshrink.train import train  # noqa: E402


# ----------------------------------------------------------------------------- reference implementations
class SeedsLoRALayer(nn.Module):
    """The seeds' LoRALayer: ``alpha * (x @ A @ B)``, A (in, r) Kaiming-style, B zeros."""

    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        std = 1 / math.sqrt(rank)
        self.A = nn.Parameter(torch.randn(in_dim, rank) * std)
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.alpha = alpha

    def forward(self, x):
        return self.alpha * (x @ self.A @ self.B)


class SeedsLinearWithLoRA(nn.Module):
    """The seeds' LinearWithLoRA: ``linear(x) + lora(x)``."""

    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = SeedsLoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x):
        return self.linear(x) + self.lora(x)


def seeds_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            model.set_submodule(name, SeedsLinearWithLoRA(module, rank, alpha))
    return model


def peft_lora(model: nn.Module, rank: int, alpha: float, targets: list[str]):
    """PEFT's LoRA on the same layers, or None when peft is not installed."""
    try:
        from peft import LoraConfig, get_peft_model
    except Exception:  # not installed (or broken install): skip the row
        return None
    return get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets))


def wide_stack(width: int = 4096, depth: int = 3) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def randomize_adapters(model: nn.Module, std: float = 0.01) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in lora.lora_layers(model).values():
            for n in w.adapter_names:
                w.lora_B[n].copy_(torch.randn(w.lora_B[n].shape, generator=gen) * std)


NAIVE = "seeds' LinearWithLoRA (naive)"
CONTROL = "base model again (noise control)"


# ----------------------------------------------------------------------------- timing
CLOCK = {"fn": time.process_time, "name": "process CPU time"}


def interleaved_times(fns: dict, *, rounds: int, min_seconds: float) -> dict[str, list[float]]:
    """Per-call seconds of each fn, one sample per round, fns run back to back in each round.

    The clock is the process's CPU time by default (``--clock cpu``): on a shared machine
    wall time also counts the time other processes hold the cores. With one torch thread
    CPU time is the work done; use ``--clock wall`` on a quiet machine with more threads.
    """
    clock = CLOCK["fn"]
    iters = {}
    for name, fn in fns.items():  # warm up and size the loop so one sample lasts >= min_seconds
        fn()
        t = clock()
        fn()
        once = max(clock() - t, 1e-6)
        iters[name] = max(1, int(min_seconds / once))
    samples = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]  # alternate order: no variant always runs first
        for name in order:
            fn, n = fns[name], iters[name]
            t = clock()
            for _ in range(n):
                fn()
            samples[name].append((clock() - t) / n)
    return samples


def summarize(samples: dict[str, list[float]], reference: str) -> dict[str, dict]:
    ref = samples[reference]
    out = {}
    for name, values in samples.items():
        ratios = [v / b for v, b in zip(values, ref)]
        out[name] = {"median_ms": 1e3 * statistics.median(values), "ratio_to_base": statistics.median(ratios),
                     "ratio_spread": [min(ratios), max(ratios)]}
    return out


# ----------------------------------------------------------------------------- 1. accuracy
def accuracy_experiment(quick: bool) -> dict:
    splits = load_digits_splits()
    x, y = splits.train.tensors

    def transposed(ds):
        a, b = ds.tensors
        return TensorDataset(a.transpose(-1, -2).contiguous(), b)

    ranks = (1, 2, 4, 8)
    epochs = 6 if quick else 15
    results = {}
    settings = {
        "shift": {
            "what": "base trained on the digits training split; adapted to transposed digits",
            "base_data": splits.train, "adapt_train": transposed(splits.train), "adapt_val": transposed(splits.val),
            "adapt_test": transposed(splits.test), "orig_test": splits.test,
        },
        "new_classes": {
            "what": "base trained on digits 0-4 only; adapted on the full training split (all ten digits)",
            "base_data": TensorDataset(x[y < 5], y[y < 5]), "adapt_train": splits.train, "adapt_val": splits.val,
            "adapt_test": TensorDataset(*[t[splits.test.tensors[1] >= 5] for t in splits.test.tensors]),
            "orig_test": splits.test,
        },
    }
    for key, s in settings.items():
        torch.manual_seed(0)
        base = MnistMLP(num_features=64)
        train(base, s["base_data"], epochs=10, lr=2e-3, progress=False, seed=0)
        rows = []
        base_bytes = _state_bytes(base)
        rows.append({"method": "base (no adaptation)", "rank": None, "trainable": 0,
                     "adapt_test_acc": accuracy(base, s["adapt_test"]), "orig_test_acc": accuracy(base, s["orig_test"]),
                     "file_bytes": None, "train_seconds": 0.0})
        for r in ranks:
            adapted = lora.add_adapters(base, r=r, lora_alpha=2 * r, target_modules="Linear")
            t = time.perf_counter()
            lora.train_adapter(adapted, s["adapt_train"], val_data=s["adapt_val"], epochs=epochs, lr=1e-2,
                               progress=False, seed=0)
            seconds = time.perf_counter() - t
            with tempfile.TemporaryDirectory() as tmp:
                lora.save_adapter(adapted, tmp)
                weights_bytes = (Path(tmp) / lora.WEIGHTS_NAME).stat().st_size
                total_bytes = lora.adapter_size_bytes(tmp)
            rows.append({"method": "LoRA", "rank": r, "trainable": lora.count_parameters(adapted).trainable,
                         "adapt_test_acc": accuracy(adapted, s["adapt_test"]),
                         "orig_test_acc": accuracy(adapted, s["orig_test"]),
                         "file_bytes": weights_bytes, "file_bytes_with_config": total_bytes,
                         "train_seconds": seconds})
        full = copy.deepcopy(base)
        t = time.perf_counter()
        train(full, s["adapt_train"], val_data=s["adapt_val"], epochs=epochs, lr=1e-3, progress=False, seed=0)
        rows.append({"method": "full fine-tuning", "rank": None,
                     "trainable": sum(p.numel() for p in full.parameters()),
                     "adapt_test_acc": accuracy(full, s["adapt_test"]), "orig_test_acc": accuracy(full, s["orig_test"]),
                     "file_bytes": base_bytes, "train_seconds": time.perf_counter() - t})
        results[key] = {"what": s["what"], "epochs": epochs, "lora_lr": 1e-2, "full_lr": 1e-3,
                        "alpha": "2·r", "targets": "all three Linear layers", "rows": rows}
    return results


def _state_bytes(model: nn.Module) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        save_tensors(path, model.state_dict())
        return path.stat().st_size


# ----------------------------------------------------------------------------- 2. training cost
def _grad_and_state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    total = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.dim() > 0:
                total += v.numel() * v.element_size()
    return total


def training_cost(quick: bool) -> dict:
    out = {}
    cases = {
        "mlp_784_128_256_10": (lambda: MnistMLP(784, 128, 256, 10), 4, 64, 784, 10),
        "wide_3x4096": (wide_stack, 8, 32, 4096, None),
    }
    for key, (make, r, batch, features, classes) in cases.items():
        torch.manual_seed(0)
        base = make()
        xb = torch.randn(batch, features)
        yb = torch.randint(0, classes, (batch,)) if classes else torch.randn(batch, features)
        loss_fn = F.cross_entropy if classes else F.mse_loss

        full = copy.deepcopy(base)
        full_opt = torch.optim.Adam(full.parameters(), lr=1e-4)
        adapted = lora.add_adapters(base, r=r, lora_alpha=2 * r, target_modules="Linear")
        lora_opt = torch.optim.Adam(lora.adapter_parameters(adapted), lr=1e-4)

        def step(model, opt, xb=xb, yb=yb, loss_fn=loss_fn):
            def run():
                opt.zero_grad(set_to_none=True)
                loss_fn(model(xb), yb).backward()
                opt.step()
            return run

        fns = {"full fine-tuning": step(full, full_opt), "LoRA": step(adapted, lora_opt)}
        samples = interleaved_times(fns, rounds=3 if quick else 7, min_seconds=0.05 if quick else 0.2)
        timing = summarize(samples, "full fine-tuning")
        # gradients are kept (zero_grad happens at the start of the next step): count them now
        mem = {"full fine-tuning": _grad_and_state_bytes(full, full_opt),
               "LoRA": _grad_and_state_bytes(adapted, lora_opt)}
        out[key] = {"rank": r, "batch": batch,
                    "trainable": {"full fine-tuning": sum(p.numel() for p in full.parameters()),
                                  "LoRA": lora.count_parameters(adapted).trainable},
                    "step": timing, "grad_optimizer_bytes": mem,
                    "memory_ratio": mem["LoRA"] / mem["full fine-tuning"]}
        del full, full_opt, adapted, lora_opt
    return out


# ----------------------------------------------------------------------------- 3. inference
def inference_latency(quick: bool) -> dict:
    out = {}
    cases = {
        "mlp_784_128_256_10": (lambda: MnistMLP(784, 128, 256, 10), 4, 256, 784,
                               ["layers.0", "layers.2", "layers.4"]),
        "wide_3x4096": (wide_stack, 8, 64, 4096, ["0", "2", "4"]),
    }
    for key, (make, r, batch, features, targets) in cases.items():
        torch.manual_seed(0)
        base = make().eval()
        x = torch.randn(batch, features)
        unmerged = lora.add_adapters(base, r=r, lora_alpha=2 * r, target_modules="Linear").eval()
        randomize_adapters(unmerged)
        merged = lora.merge_adapters(copy.deepcopy(unmerged))
        removed = lora.remove_adapters(unmerged, merge=True)
        variants = {"base model": base, CONTROL: copy.deepcopy(base), "LoRA unmerged (rankshrink)": unmerged,
                    "LoRA merged, wrappers kept": merged, "LoRA merged + removed (plain layers)": removed,
                    NAIVE: seeds_lora(base, r, 2.0).eval()}
        peft_model = peft_lora(base, r, 2 * r, targets)
        if peft_model is not None:
            variants["PEFT LoRA unmerged"] = peft_model.eval()
        with torch.inference_mode():
            ref = unmerged(x)
            for name in ("LoRA merged, wrappers kept", "LoRA merged + removed (plain layers)"):
                assert torch.allclose(variants[name](x), ref, atol=1e-4), name
            fns = {name: (lambda m=m, x=x: m(x)) for name, m in variants.items()}
            samples = interleaved_times(fns, rounds=5 if quick else 21, min_seconds=0.05 if quick else 0.15)
        out[key] = {"rank": r, "batch": batch, "peft_installed": peft_model is not None,
                    "latency": summarize(samples, "base model")}
    return out


# ----------------------------------------------------------------------------- report
def _pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f}%"


def _bytes(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def markdown(result: dict) -> str:
    lines = ["# LoRA benchmark", "", provenance_line(result["provenance"]), "",
             f"torch {result['env']['torch']}, {result['env']['threads']} thread(s), {result['env']['machine']}; "
             f"run took {result['env']['seconds']:.0f} s. Timings: {result['env']['clock']}, medians over "
             "interleaved rounds (every variant runs once per round, order alternating). The machine is shared, "
             "so compare the ratios (measured side by side), not absolute times. "
             + (f"PEFT {result['env']['peft']} rows use Hugging Face PEFT itself." if result["env"].get("peft")
                else "PEFT is not installed, so its rows are skipped."), ""]
    lines += ["## 1. The seeds' experiment on digits", ""]
    for key, exp in result["accuracy"].items():
        lines += [f"**{key}**: {exp['what']}. LoRA on all three Linear layers, alpha = 2·r, "
                  f"{exp['epochs']} epochs at lr {exp['lora_lr']}; full fine-tuning {exp['epochs']} epochs at lr "
                  f"{exp['full_lr']}. 'adapted acc' is test accuracy on the target data "
                  f"({'transposed digits' if key == 'shift' else 'digits 5-9'}), 'original acc' on the "
                  "untouched digits test split (all ten).", "",
                  "| method | rank | trainable params | adapted acc | original acc | file size | train s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for row in exp["rows"]:
            lines.append(f"| {row['method']} | {row['rank'] or '-'} | {row['trainable']:,} | "
                         f"{row['adapt_test_acc']:.3f} | {row['orig_test_acc']:.3f} | {_bytes(row['file_bytes'])} | "
                         f"{row['train_seconds']:.1f} |")
        lines.append("")
    lines += ["File size: adapter_model.safetensors for LoRA (the config JSON adds ~1 KB), the whole "
              "model's weights for full fine-tuning. The base model itself is unchanged by LoRA "
              "(`adapters_disabled` gives its original accuracy back).", ""]
    lines += ["## 2. Training step: LoRA vs full fine-tuning", "",
              "| model | rank | batch | trainable (full → LoRA) | step ms (full) | step ms (LoRA) | LoRA/full time "
              "| grad+Adam bytes (full → LoRA) | LoRA/full memory |",
              "|---|---:|---:|---|---:|---:|---:|---|---:|"]
    for key, c in result["training"].items():
        st, mem, tr = c["step"], c["grad_optimizer_bytes"], c["trainable"]
        lines.append(f"| {key} | {c['rank']} | {c['batch']} | {tr['full fine-tuning']:,} → {tr['LoRA']:,} | "
                     f"{st['full fine-tuning']['median_ms']:.2f} | {st['LoRA']['median_ms']:.2f} | "
                     f"{st['LoRA']['ratio_to_base']:.2f} | {_bytes(mem['full fine-tuning'])} → {_bytes(mem['LoRA'])} "
                     f"| {100 * c['memory_ratio']:.2f}% |")
    lines += ["", "## 3. Inference latency", ""]
    for key, c in result["inference"].items():
        lines += [f"**{key}**, rank {c['rank']}, batch {c['batch']}"
                  + ("" if c["peft_installed"] else " (PEFT not installed: row skipped)"), "",
                  "| variant | median ms | vs base (median of per-round ratios) | range |",
                  "|---|---:|---:|---|"]
        for name, v in c["latency"].items():
            lo, hi = v["ratio_spread"]
            lines.append(f"| {name} | {v['median_ms']:.3f} | {_pct(v['ratio_to_base'])} | "
                         f"{_pct(lo)} … {_pct(hi)} |")
        lines.append("")
    goals = result["goals"]
    lines += ["## Goals", ""] + [f"- {g['goal']}: **{g['measured']}** - {'met' if g['met'] else 'NOT met'}"
                                 for g in goals]
    return "\n".join(lines) + "\n"


def goals(result: dict) -> list[dict]:
    inf, tr = result["inference"], result["training"]
    small, wide = inf["mlp_784_128_256_10"]["latency"], inf["wide_3x4096"]["latency"]
    g = []
    for key, lat in (("small MLP", small), ("wide stack", wide)):
        ratio = lat["LoRA merged + removed (plain layers)"]["ratio_to_base"]
        kept = lat["LoRA merged, wrappers kept"]["ratio_to_base"]
        control = lat[CONTROL]["ratio_to_base"]
        # "within noise": no slower than the base by more than 5% or than the base timed again
        g.append({"goal": f"merged inference within noise of the base ({key})",
                  "measured": f"merged+removed {_pct(ratio)}, merged with wrappers {_pct(kept)} "
                              f"(the base timed again: {_pct(control)})",
                  "met": max(ratio, kept) <= max(1.05, control + 0.02)})
    w = wide["LoRA unmerged (rankshrink)"]["ratio_to_base"]
    g.append({"goal": "unmerged forward overhead <= 10% at r=8 on the wide stack", "measured": _pct(w),
              "met": w <= 1.10})
    s = small["LoRA unmerged (rankshrink)"]["ratio_to_base"]
    peft = small.get("PEFT LoRA unmerged")
    ref = peft["ratio_to_base"] if peft else 1.64
    g.append({"goal": "unmerged overhead on the small MLP (r=4, batch 256) below PEFT's "
                      + ("(measured here)" if peft else "(+64% measured elsewhere)"),
              "measured": f"rankshrink {_pct(s)} vs PEFT {_pct(ref)}; seeds' naive "
                          f"{_pct(small[NAIVE]['ratio_to_base'])}",
              "met": s < ref})
    m = tr["wide_3x4096"]["memory_ratio"]
    g.append({"goal": "LoRA gradient+optimizer memory <= 5% of full fine-tuning (wide stack)",
              "measured": f"{100 * m:.2f}%", "met": m <= 0.05})
    return g


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: CPU-time ratios stay meaningful on a shared machine)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: process CPU time (default; robust to other load with --threads 1); wall: elapsed")
    parser.add_argument("--quick", action="store_true", help="fewer epochs and rounds (a smoke run)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.clock == "wall":
        CLOCK.update(fn=time.perf_counter, name="wall-clock time")
    start = time.perf_counter()
    result = {"env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "clock": CLOCK["name"],
                      "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                      "python": platform.python_version()}}
    try:
        import peft
        result["env"]["peft"] = peft.__version__
    except Exception:
        result["env"]["peft"] = None
    print("1/3 accuracy experiment ...", flush=True)
    result["accuracy"] = accuracy_experiment(args.quick)
    print("2/3 training step cost ...", flush=True)
    result["training"] = training_cost(args.quick)
    print("3/3 inference latency ...", flush=True)
    result["inference"] = inference_latency(args.quick)
    result["env"]["seconds"] = time.perf_counter() - start
    result["goals"] = goals(result)
    out = Path(args.out)
    result["provenance"] = provenance()
    atomic_write_json(out / "lora.json", result)
    text = markdown(result)
    atomic_write_text(out / "lora.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
