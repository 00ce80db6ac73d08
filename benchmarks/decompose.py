"""Benchmark: how fast and how accurate are rankshrink's decompositions?

Two questions, one run (about 1.5 minutes on 2 idle CPU cores, several times that on
a busy machine; most of it goes to the two slow references, LAPACK's full 4096×4096
SVD and TensorLy's default ``parafac``):

1. **Randomized vs exact SVD** (``rankshrink.decompose.truncated_svd``): time and
   relative error ``‖A − Â‖_F / ‖A‖_F`` of ``method='exact'`` (LAPACK, float64) and
   ``method='randomized'`` (range finder, float32) on a 4096×4096 and an 8192×128
   float32 matrix at rank 64. Target: randomized >= 20× faster at <= 0.5% extra error.
2. **CP and Tucker-2 of a conv kernel** (``rankshrink.decompose.cp`` with
   ``method='compressed'`` and ``tucker2``) against TensorLy's defaults
   (``parafac(kernel, 64)``, ``partial_tucker(kernel, [64, 64], modes=[0, 1])``) on a
   256×256×3×3 kernel at rank 64. Target: our CP >= 5× faster than ``parafac`` at
   equal or lower error.

"Trained-like" inputs: power-law spectra plus noise, seeded (see ``trained_like_*``;
the generators are also written into the Markdown). Each variant is timed several
times, interleaved with the variant it is compared with so machine noise hits both
alike; medians are reported, and ratios come from the same run.

Writes ``benchmarks/results/decompose.json`` and ``decompose.md``.
Usage: ``python benchmarks/decompose.py [--repeats N] [--slow-repeats N] [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import provenance, provenance_line  # noqa: E402
from rankshrink.decompose import cp, reconstruct_cp, reconstruct_tucker2, truncated_svd, tucker2  # noqa: E402
from rankshrink.decompose.svd import choose_svd_method  # noqa: E402
from rankshrink.files import atomic_write_json, atomic_write_text  # noqa: E402

F64 = torch.float64

MATRIX_GENERATOR = (
    "A = U·diag(σ)·Vᵀ + E, float32. U (m×c), V (n×c): orthonormal (QR of Gaussian), c = min(m, n, 512) "
    "components; σ_i = i^-1.0; E Gaussian with entries of std 0.005·σ_1/√max(m, n), so the noise's "
    "singular values sit near 0.005·σ_1·(1 + √(min/max)) - a flat tail under the power law, like the "
    "initialisation noise left in trained weights."
)
KERNEL_GENERATOR = (
    "K = G ×₀ U ×₁ V + E, float32, shape (T, S, 3, 3). U (T×T), V (S×S): random orthogonal; core "
    "G[t,s,i,j] ~ N(0,1)·(t+1)^-0.8·(s+1)^-0.8 (power-law decay along both channel modes); E Gaussian "
    "with std 0.05·std(G ×₀ U ×₁ V)."
)


def trained_like_matrix(m: int, n: int, *, exponent: float = 1.0, noise: float = 0.005,
                        components: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = min(m, n, components)
    U, _ = torch.linalg.qr(torch.randn(m, c, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(n, c, generator=g, dtype=F64))
    sigma = torch.arange(1, c + 1, dtype=F64) ** -exponent
    A = (U * sigma) @ V.T
    A += noise * float(sigma[0]) / max(m, n) ** 0.5 * torch.randn(m, n, generator=g, dtype=F64)
    return A.float()


def trained_like_kernel(T: int, S: int, k: int = 3, *, exponent: float = 0.8, noise: float = 0.05,
                        seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(T, T, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(S, S, generator=g, dtype=F64))
    a = torch.arange(1, T + 1, dtype=F64) ** -exponent
    b = torch.arange(1, S + 1, dtype=F64) ** -exponent
    core = torch.randn(T, S, k, k, generator=g, dtype=F64) * a[:, None, None, None] * b[None, :, None, None]
    K = torch.einsum("ta,abij,sb->tsij", U, core, V)
    K += noise * float(K.std()) * torch.randn(K.shape, generator=g, dtype=F64)
    return K.float()


def rel_error(approx: torch.Tensor, target: torch.Tensor) -> float:
    target = target.to(F64)
    return float((approx.to(F64) - target).norm() / target.norm())


class Timer:
    """Wall and process-CPU seconds of each call; the result of the last call is kept."""

    def __init__(self, fn):
        self.fn, self.wall, self.cpu, self.result = fn, [], [], None

    def __call__(self):
        c0, w0 = time.process_time(), time.perf_counter()
        self.result = self.fn()
        self.wall.append(time.perf_counter() - w0)
        self.cpu.append(time.process_time() - c0)


def interleaved(ours: Timer, reference: Timer, repeats: int, reference_repeats: int) -> None:
    """Alternate the two so load changes on the shared machine hit both alike."""
    for round_ in range(max(repeats, reference_repeats)):
        first, second = (ours, reference) if round_ % 2 == 0 else (reference, ours)
        for timer in (first, second):
            if len(timer.wall) < (repeats if timer is ours else reference_repeats):
                timer()


def row(task: str, variant: str, timer: Timer, error: float, **extra) -> dict:
    return {"task": task, "variant": variant, "wall_s": statistics.median(timer.wall),
            "cpu_s": statistics.median(timer.cpu), "wall_runs": timer.wall, "cpu_runs": timer.cpu,
            "rel_error": error, **extra}


def compare(ours: dict, reference: dict, *, speedup_target: float, error_target: float | None,
            error_rule: str) -> dict:
    speedup = reference["wall_s"] / ours["wall_s"]
    extra = ours["rel_error"] / reference["rel_error"] - 1.0
    met = speedup >= speedup_target and (extra <= error_target if error_target is not None else True)
    return {"task": ours["task"], "ours": ours["variant"], "reference": reference["variant"],
            "speedup_wall": speedup, "speedup_cpu": reference["cpu_s"] / ours["cpu_s"],
            "extra_error": extra, "target": f">= {speedup_target:g}× faster, {error_rule}", "met": met}


# ----------------------------------------------------------------------------- the benchmarks
def bench_svd(shape, rank, repeats, slow_repeats):
    A = trained_like_matrix(*shape)
    task = f"SVD {shape[0]}×{shape[1]}, rank {rank}"

    def run(method):
        U, S, Vh = truncated_svd(A, rank, method=method, seed=0)
        return (U.to(F64) * S.to(F64)) @ Vh.to(F64)

    exact, randomized = Timer(lambda: run("exact")), Timer(lambda: run("randomized"))
    big = min(shape) >= 1024
    interleaved(randomized, exact, repeats, slow_repeats if big else repeats)
    rows = [row(task, "exact (LAPACK, float64)", exact, rel_error(exact.result, A)),
            row(task, "randomized (float32, 10 oversample, 4 power iters)", randomized,
                rel_error(randomized.result, A))]
    comparison = compare(rows[1], rows[0], speedup_target=20, error_target=0.005,
                         error_rule="<= 0.5% extra relative error")
    comparison["auto_picks"] = choose_svd_method(shape, rank)
    return rows, comparison


def bench_kernel(shape, rank, repeats, slow_repeats):
    import tensorly as tl
    from tensorly.decomposition import parafac, partial_tucker

    K = trained_like_kernel(*shape[:2], shape[2])
    K64 = K.to(F64).numpy()
    task = f"{shape[0]}×{shape[1]}×{shape[2]}×{shape[3]} kernel, rank {rank}"
    sweeps = {}

    def tl_parafac():
        with tl.backend_context("numpy"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cp_tensor, errors = parafac(K64, rank, return_errors=True)  # TensorLy's defaults
        sweeps["parafac"] = len(errors)
        return torch.from_numpy(tl.cp_to_tensor(cp_tensor))

    def tl_tucker():
        with tl.backend_context("numpy"):
            (core, factors), _ = partial_tucker(K64, rank=[rank, rank], modes=[0, 1])
            return torch.from_numpy(tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1]))

    ours_cp = Timer(lambda: reconstruct_cp(cp(K, rank, method="compressed")))
    ref_cp = Timer(tl_parafac)
    interleaved(ours_cp, ref_cp, repeats, slow_repeats)
    ours_tk = Timer(lambda: reconstruct_tucker2(tucker2(K, rank)))
    ref_tk = Timer(tl_tucker)
    interleaved(ours_tk, ref_tk, repeats, repeats)
    rows = [row(f"CP, {task}", "rankshrink cp(method='compressed')", ours_cp, rel_error(ours_cp.result, K)),
            row(f"CP, {task}", f"TensorLy parafac (defaults: SVD init, tol 1e-8, ran {sweeps['parafac']} sweeps)",
                ref_cp, rel_error(ref_cp.result, K)),
            row(f"Tucker-2, {task}", "rankshrink tucker2", ours_tk, rel_error(ours_tk.result, K)),
            row(f"Tucker-2, {task}", "TensorLy partial_tucker (defaults: SVD init, tol 1e-4)", ref_tk,
                rel_error(ref_tk.result, K))]
    comparisons = [compare(rows[0], rows[1], speedup_target=5, error_target=0.0, error_rule="equal or lower error"),
                   compare(rows[2], rows[3], speedup_target=0, error_target=None, error_rule="no target")]
    comparisons[1]["target"] = "none (side by side only)"
    return rows, comparisons


# ----------------------------------------------------------------------------- reporting
def machine() -> dict:
    import tensorly

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cores": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "numpy": np.__version__, "tensorly": tensorly.__version__, "python": platform.python_version(),
            "platform": platform.platform()}
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = os.getloadavg()[0]
    return info


def fmt_s(seconds: float) -> str:
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Decomposition benchmark", "", provenance_line(result["provenance"]), "",
        f"{m['cores']} cores ({m['cpu']}), torch {m['torch']} ({m['torch_threads']} threads), numpy {m['numpy']}, "
        f"TensorLy {m['tensorly']}; load average {m.get('load_average_start', float('nan')):.1f} at start, "
        f"{m.get('load_average_end', float('nan')):.1f} at end; run took {result['runtime_s']:.0f} s. "
        "Times are medians (wall clock; process CPU time alongside) over interleaved repeats: "
        f"{result['repeats']} for fast variants, {result['slow_repeats']} for the two slow references "
        "(full 4096² LAPACK SVD, TensorLy parafac). The machine is shared, so compare the ratios "
        "(measured side by side), not absolute times. Errors: ‖X − X̂‖_F / ‖X‖_F in float64.", "",
        "## Results", "",
        "| task | variant | wall s | CPU s | relative error |",
        "|---|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['task']} | {r['variant']} | {fmt_s(r['wall_s'])} | {fmt_s(r['cpu_s'])} | "
                     f"{r['rel_error']:.5f} |")
    lines += ["", "## Against the targets", "",
              "| task | ours vs reference | speed-up (wall) | speed-up (CPU) | extra error | target | met |",
              "|---|---|---:|---:|---:|---|---|"]
    for c in result["comparisons"]:
        met = "yes" if c["met"] else "**no**"
        if c["target"].startswith("none"):
            met = "-"
        lines.append(f"| {c['task']} | {c['ours']} vs {c['reference']} | {c['speedup_wall']:.1f}× | "
                     f"{c['speedup_cpu']:.1f}× | {100 * c['extra_error']:+.2f}% | {c['target']} | {met} |")
    lines += ["", "## Inputs", "", f"- Matrices: {result['generators']['matrix']}",
              f"- Kernel: {result['generators']['kernel']}", "- Seeds: 0 for every generator and decomposition.",
              "", "## Notes", ""]
    lines += [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def notes(result: dict) -> list[str]:
    out = []
    for c in result["comparisons"]:
        if c["task"].startswith("SVD") and "auto_picks" in c:
            out.append(f"{c['task']}: `method='auto'` picks **{c['auto_picks']}** for this shape.")
    skinny = [c for c in result["comparisons"] if c["task"].startswith("SVD") and c.get("auto_picks") == "exact"]
    if skinny and not all(c["met"] for c in skinny):
        out.append("Tall-skinny 8192×128 at rank 64 (half the small side): LAPACK's SVD of a 128-wide matrix "
                   "is already cheap (one QR plus a 128×128 SVD), and the range finder needs 74 of 128 columns "
                   "plus power iterations, so randomized cannot be 20× faster here; that is why 'auto' keeps "
                   "the exact SVD for it. The 20× target applies where 'auto' chooses randomized.")
    out.append("TensorLy's parafac is called with its defaults, including random_state=None: its SVD init "
               "pads the 3-wide spatial modes with random columns, so its error varies a little from run to "
               "run (ours is seeded and repeatable).")
    out.append("Our CP ('compressed'): HOSVD projection of both channel modes onto R = 64 columns, CP-ALS "
               "on the 64×64×3×3 core (up to 100 sweeps), lifted back, then up to 25 ALS sweeps on the full "
               "kernel. Its sweeps contract the kernel with one factor at a time (never a Khatri-Rao "
               "product), in torch. TensorLy's parafac runs its sweeps on the full kernel until the error "
               "changes by < 1e-8.")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each fast variant (median)")
    parser.add_argument("--slow-repeats", type=int, default=1,
                        help="timed runs of the full 4096² LAPACK SVD and of TensorLy parafac")
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke test")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    repeats, slow = (1, 1) if args.quick else (args.repeats, args.slow_repeats)
    svd_cases = [((512, 512), 16), ((2048, 64), 16)] if args.quick else [((4096, 4096), 64), ((8192, 128), 64)]
    kernel_case = ((64, 64, 3, 3), 16) if args.quick else ((256, 256, 3, 3), 64)
    start = time.perf_counter()
    result = {"benchmark": "decompose", "machine": machine(), "repeats": repeats, "slow_repeats": slow,
              "quick": args.quick, "generators": {"matrix": MATRIX_GENERATOR, "kernel": KERNEL_GENERATOR},
              "rows": [], "comparisons": []}
    # Warm-up (imports, thread pools, first-call allocations) outside the timings.
    truncated_svd(trained_like_matrix(300, 200, components=50), 8, method="randomized")
    cp(trained_like_kernel(16, 16), 4, method="compressed")
    tucker2(trained_like_kernel(16, 16), 4)
    bench_kernel((16, 16, 3, 3), 4, 1, 1)
    for shape, rank in svd_cases:
        rows, comparison = bench_svd(shape, rank, repeats, slow)
        result["rows"] += rows
        result["comparisons"].append(comparison)
        print(f"{comparison['task']}: {comparison['speedup_wall']:.1f}× faster, "
              f"{100 * comparison['extra_error']:+.2f}% error", flush=True)
    rows, comparisons = bench_kernel(*kernel_case, repeats, slow)
    result["rows"] += rows
    result["comparisons"] += comparisons
    for c in comparisons:
        print(f"{c['task']}: {c['speedup_wall']:.1f}× faster, {100 * c['extra_error']:+.2f}% error", flush=True)
    result["runtime_s"] = time.perf_counter() - start
    if hasattr(os, "getloadavg"):
        result["machine"]["load_average_end"] = os.getloadavg()[0]
    result["notes"] = notes(result)
    args.out.mkdir(parents=True, exist_ok=True)
    result["provenance"] = provenance()
    atomic_write_json(args.out / "decompose.json", result)
    atomic_write_text(args.out / "decompose.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
