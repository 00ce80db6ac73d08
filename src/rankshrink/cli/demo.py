"""``rankshrink demo``: the main job on the built-in default, start to finish.

Trains (or loads the cached) digits CNN, compresses it within a one-point accuracy
tolerance on the validation split, and prints accuracy (validation and test), size
and MACs before and after. A first run with a cold cache takes well under a minute
on two cores; a second run reads everything from the cache.
"""

from __future__ import annotations

import argparse
import time

from .common import (
    add_command,
    add_output_options,
    add_report_option,
    format_bytes,
    format_count,
    set_result,
    write_run_report,
)


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "demo", help="train (or load) the digits CNN and compress it within 1 accuracy point",
        description="The whole pipeline on the built-in digits CNN: train or load it, search ranks within a "
                    "one-point validation-accuracy tolerance, report before/after accuracy, size and MACs. With "
                    "--out DIR it also writes what compress writes there (the model, plan.json, summary.json, "
                    "report.html).",
        examples=["rankshrink demo", "rankshrink demo --out demo/   # then open demo/report.html",
                  "rankshrink demo --quiet --json > demo.json"])
    parser.add_argument("--tolerance", default="0.01", help="accuracy tolerance (default 0.01 = one point)")
    parser.add_argument("--out", metavar="DIR", help="also save the compressed model, its plan, summary and report")
    parser.add_argument("--force", action="store_true", help="allow a non-empty --out (replaces our files only)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the evaluation cache")
    add_output_options(parser)
    add_report_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data import _dataset_len
    from ..models import load_builtin
    from ..search import compress
    from ..search.evaluate import single_threaded
    from .compress import parse_tolerance, print_report

    tolerance = parse_tolerance(args.tolerance)
    if args.out:
        from ..files import check_output_dir

        check_output_dir(args.out, force=args.force)  # before any work
    start = time.perf_counter()
    with single_threaded():  # a tiny model: one thread is as fast, and far faster on a busy machine
        model, splits = load_builtin("digits-cnn", progress=not args.quiet)
    loaded = time.perf_counter() - start
    sizes = [_dataset_len(part) for part in (splits.train, splits.val, splits.test)]
    print(f"digits CNN on {splits.name}: {sizes[0]} train / {sizes[1]} validation / "
          f"{sizes[2]} test images, one validation image = {100 / sizes[1]:.2f} accuracy points "
          f"({loaded:.1f} s to train or load)")
    result = compress(model, splits, tolerance=tolerance, cache=not args.no_cache, progress=not args.quiet)
    print_report(result)
    total = time.perf_counter() - start
    summary = result.summary()
    o, c = summary["original"], summary["compressed"]
    print(f"\ndemo: {format_count(o['params'])} -> {format_count(c['params'])} parameters, "
          f"{format_count(o['macs'])} -> {format_count(c['macs'])} MACs, {format_bytes(o['bytes'])} -> "
          f"{format_bytes(c['bytes'])}, in {total:.1f} s")
    summary.update({"model": "builtin:digits-cnn", "data": "builtin:digits", "seconds_total": round(total, 3),
                    "seconds_model": round(loaded, 3)})
    if args.out:
        from ..report_data import enrich_summary
        from .compress import write_outputs

        summary.setdefault("probes", result.probes)
        enrich_summary(summary, original=model, compressed=result.model, plan=result.plan.to_dict()["layers"],
                       splits=splits, argv=args.argv, data_spec="builtin:digits", model_spec="builtin:digits-cnn",
                       seed=result.seed)
        write_outputs(result.model, result.plan, summary, args.out, force=args.force)
        report = write_run_report(args, args.out)
        print(f"wrote {args.out}/plan.json, model.safetensors, summary.json" + (", report.html" if report else ""))
        summary = {**summary, "out": str(args.out), "report": report}
    set_result(args, summary)
    return 0
