"""Benchmark: does the search scale to a BERT-base-shaped encoder? (issue 15)

One run, one process, on a random-initialized Hugging Face ``BertModel`` (BERT-base's shape by default:
12 layers, hidden 768, feed-forward 3072, a 30522-token vocabulary; random weights are fine for timing)
fed random token sequences of random lengths with their attention mask:

1. **One calibration pass**: a plain ``torch.no_grad()`` forward over the calibration sentences
   (the unit every time below is expressed in), measured in the same run.
2. **compress** to 50% of the *whole model's* parameters (the word embedding is factorizable now),
   ``--metric cosine``, the closed-form distortions: its wall time (calibration + search + the final
   model) as a multiple of that pass, the search's own timings, and the process's peak resident memory
   next to the issue's limit (3 × the model's float32 size + 1 GiB).
3. **cosine** (validation and test, mask-mean-pooled last hidden state against the original) at that
   budget without fine-tuning, and after ``--distill-epochs`` of distillation (cosine loss, the default
   encoder learning rate). Random weights say nothing about a pretrained encoder's quality; these two
   numbers only show the path runs at this size.
4. With ``--ray``: the same compress again in-process and with 2 local Ray workers, one after the other
   (one run each, not repeated), and the ratio of their wall times (the Ray one includes starting the
   workers); the plans must be equal.

Writes ``benchmarks/results/scale.json`` and ``scale.md``. On the shared 2-core development machine the
full shape with 128-token sentences takes too long; ``--seq`` and ``--sentences`` shrink the data (the
Markdown says what was used).
Usage: ``python benchmarks/scale.py [--layers 12 --hidden 768 --seq 32 --sentences 96] [--ray] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import rankshrink as rs  # noqa: E402
from provenance import provenance, provenance_line  # noqa: E402
from rankshrink.data.splits import split_data  # noqa: E402
from rankshrink.files import atomic_write_json, atomic_write_text  # noqa: E402
from rankshrink.search.metrics import as_metric  # noqa: E402


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def make_encoder(args):
    if args.hf:
        from rankshrink.models.hf import load_hf_model

        return load_hf_model(args.hf)
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=max(1, args.hidden // 64), intermediate_size=4 * args.hidden,
                        max_position_embeddings=max(512, args.seq))
    return BertModel(config).eval()


def make_data(args):
    """Random sentences: token ids (Zipf-like, as text is) with random lengths, padded, with the mask; or, with
    ``--text``, the lines of a text file tokenized by the ``--hf`` model's tokenizer (60/20/20 split)."""
    if args.text:
        from rankshrink.data.text import load_text

        return load_text(args.text, args.hf, max_length=args.seq, fractions=(0.6, 0.2, 0.2), seed=0)
    gen = torch.Generator().manual_seed(1)
    n = args.sentences * 3  # train (calibration, probes, distillation), validation, test: a third each
    ranks = torch.arange(1, args.vocab + 1, dtype=torch.float64)
    frequencies = 1.0 / ranks  # Zipf
    ids = torch.multinomial(frequencies, n * args.seq, replacement=True, generator=gen).reshape(n, args.seq)
    ids[:, 0] = 101 % args.vocab  # [CLS]
    lengths = torch.randint(args.seq // 4, args.seq + 1, (n,), generator=gen)
    mask = (torch.arange(args.seq)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return split_data(inputs, None, fractions=(1 / 3, 1 / 3, 1 / 3), seed=0, name="random-sentences",
                      trim_key="attention_mask")


def forward_pass_seconds(model, dataset, batch_size: int = 32) -> float:
    from rankshrink.data import iterate_batches
    from rankshrink.inputs import call_model, to_model

    start = time.perf_counter()
    with torch.no_grad():
        for inputs, _ in iterate_batches(dataset, batch_size):
            call_model(model, to_model(inputs, model))
    return time.perf_counter() - start


def compress(model, splits, args, **extra):
    return rs.compress(model, splits, budget={"params": 0.5}, metric="cosine", cache=False, progress=False,
                       calibration_samples=args.sentences, probe_samples=args.probe_samples,
                       proxy_samples=args.probe_samples, distortion="closed-form", seed=0, **extra)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--seq", type=int, default=32, help="tokens per sentence at most (BERT-base uses 128)")
    parser.add_argument("--sentences", type=int, default=96, help="calibration sentences (and per split)")
    parser.add_argument("--probe-samples", type=int, default=16)
    parser.add_argument("--distill-epochs", type=int, default=1)
    parser.add_argument("--distill-loss", default="auto", help="finetune's distill_loss (auto: cosine for encoders)")
    parser.add_argument("--train", default="factors", help="finetune's train: factors or all")
    parser.add_argument("--lr", type=float, default=None, help="finetune lr (default: its encoder default)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ray", action="store_true", help="also time 1 vs 2 Ray workers")
    parser.add_argument("--hf", help="a real encoder instead: a local Hugging Face model directory")
    parser.add_argument("--text", help="with --hf: a text file, one sentence per line")
    parser.add_argument("--name", default="scale", help="output file stem (default scale)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = make_encoder(args)
    splits = make_data(args)
    params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    calibration_set = torch.utils.data.Subset(splits.train, range(min(args.sentences, len(splits.train))))
    forward_pass_seconds(model, torch.utils.data.Subset(splits.train, range(8)))  # warm-up
    one_pass = forward_pass_seconds(model, calibration_set)
    print(f"model {params / 1e6:.1f} M parameters; one calibration pass over {len(calibration_set)} sentences "
          f"({args.seq} tokens at most): {one_pass:.2f} s", flush=True)

    rss_before = peak_rss_bytes()
    start = time.perf_counter()
    result = compress(model, splits, args, threads=args.threads)
    compress_seconds = time.perf_counter() - start
    rss_peak = peak_rss_bytes()
    print(f"compress: {compress_seconds:.1f} s = {compress_seconds / one_pass:.1f} calibration passes; "
          f"timings {result.timings}; peak RSS {rss_peak / 2**30:.2f} GiB", flush=True)
    cosine_val = result.value
    test_metric = as_metric("cosine", model, splits.test)
    cosine_test = test_metric(result.model)
    print(f"cosine at 50% of the model's parameters: validation {cosine_val:.4f}, test {cosine_test:.4f}",
          flush=True)

    distilled: dict | None = None
    if args.distill_epochs > 0:
        start = time.perf_counter()
        tuned = rs.finetune(result.model, splits, args.distill_epochs, teacher=model, batch_size=16, progress=False,
                            distill_loss=args.distill_loss, train=args.train,
                            **({"lr": args.lr} if args.lr is not None else {}))
        distilled = {"epochs": args.distill_epochs, "lr": tuned.train.history[0]["lr"] if tuned.train.history else None,
                     "loss": args.distill_loss, "train": args.train,
                     "val_before": tuned.val_before, "val_after": tuned.val_after,
                     "test_after": test_metric(tuned.model), "best_epoch": tuned.train.best_epoch,
                     "seconds": time.perf_counter() - start}
        print(f"distilled {args.distill_epochs} epoch(s): validation cosine {tuned.val_before:.4f} -> "
              f"{tuned.val_after:.4f}, test {distilled['test_after']:.4f}", flush=True)

    ray: dict | None = None
    if args.ray:
        times: dict[int, list[float]] = {1: [], 2: []}
        for workers in (1, 2):  # 1 = in-process: the pool only starts for workers > 1
            start = time.perf_counter()
            other = compress(model, splits, args, workers=workers if workers > 1 else None, threads=args.threads)
            times[workers].append(time.perf_counter() - start)
            assert other.plan.key() == result.plan.key(), "Ray found another plan"
        ray = {"seconds_1": times[1][0], "seconds_2": times[2][0], "ratio_2_over_1": times[2][0] / times[1][0]}
        print(f"ray: 1 worker {times[1][0]:.1f} s, 2 workers {times[2][0]:.1f} s", flush=True)

    data = {
        "provenance": provenance(),
        "model": args.hf or "random BertModel", "text": args.text,
        "shape": {"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab, "seq": args.seq,
                  "sentences": args.sentences, "probe_samples": args.probe_samples},
        "params": params, "model_float32_bytes": model_bytes,
        "one_calibration_pass_seconds": one_pass,
        "compress_seconds": compress_seconds, "compress_in_calibration_passes": compress_seconds / one_pass,
        "timings": result.timings, "evaluations": result.evaluations,
        "peak_rss_bytes": rss_peak, "peak_rss_before_compress_bytes": rss_before,
        "rss_limit_bytes": 3 * model_bytes + 2**30,
        "compressed_params_ratio": result.ratio("params"),
        "cosine_val": cosine_val, "cosine_test": cosine_test, "distilled": distilled, "ray": ray,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{args.name}.json", data)
    what = (f"The pretrained encoder in `{args.hf}` ({params / 1e6:.1f} M parameters, {model_bytes / 2**20:.0f} MiB "
            f"in float32) on the sentences of `{args.text}` (at most {args.seq} tokens)" if args.hf else
            f"Random-initialized `BertModel`: {args.layers} layers, hidden {args.hidden}, vocabulary {args.vocab} "
            f"({params / 1e6:.1f} M parameters, {model_bytes / 2**20:.0f} MiB in float32); random Zipf-distributed "
            f"sentences of at most {args.seq} tokens")
    lines = [
        "# Scaling: compress of " + ("a pretrained encoder" if args.hf else "a BERT-base-shaped encoder"),
        "",
        provenance_line(data["provenance"]),
        "",
        f"{what}; {args.sentences} calibration sentences, {args.probe_samples} "
        f"probe sentences, {len(splits.val)} validation and {len(splits.test)} test sentences. Command: "
        f"`python benchmarks/scale.py {' '.join(sys.argv[1:])}`.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| one calibration pass (plain forward) | {one_pass:.2f} s |",
        f"| compress to 50% of the model's parameters (calibration + search) | {compress_seconds:.1f} s "
        f"= **{compress_seconds / one_pass:.1f} calibration passes** (goal: at most 100) |",
        "| of which calibration / closed form / probes / factorize / evaluate | "
        + " / ".join(f"{result.timings.get(k, 0.0):.1f} s" for k in ("calibrate", "closed_form", "proxy",
                                                                       "factorize", "evaluate")) + " |",
        f"| whole-model evaluations | {result.evaluations} |",
        f"| peak RSS of the process | {rss_peak / 2**30:.2f} GiB (limit 3 × model + 1 GiB = "
        f"{data['rss_limit_bytes'] / 2**30:.2f} GiB; {rss_before / 2**30:.2f} GiB before compress) |",
        f"| parameters kept | {100 * result.ratio('params'):.1f}% |",
        f"| cosine, no fine-tuning (validation / test) | {cosine_val:.4f} / {cosine_test:.4f} |",
    ]
    if distilled:
        lines.append(f"| cosine after {distilled['epochs']} epoch(s) of distillation, lr {distilled['lr']:g}, loss "
                     f"{distilled['loss']}, training the {distilled['train']} parameters "
                     f"(validation / test) | {distilled['val_after']:.4f} / {distilled['test_after']:.4f} |")
    if ray:
        lines.append(f"| compress wall time, 2 Ray workers / in-process | {ray['ratio_2_over_1']:.2f} "
                     f"({ray['seconds_2']:.1f} s / {ray['seconds_1']:.1f} s) |")
    if not args.hf:
        lines += ["", "Random weights: the cosines show the path runs at this size, not the quality on a pretrained "
                  "encoder (see `scale_minilm.md` for one).", ""]
    else:
        lines.append("")
    atomic_write_text(out / f"{args.name}.md", "\n".join(lines))
    print(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
