"""``rankshrink demo``: the main job on the built-in default, start to finish.

Trains (or loads the cached) digits CNN, compresses it within a one-point accuracy
tolerance on the validation split, and prints accuracy (validation and test), size
and MACs before and after. A first run with a cold cache takes well under a minute
on two cores; a second run reads everything from the cache.
"""

from __future__ import annotations

import argparse
import time

from .common import format_bytes, format_count


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="train (or load) the digits CNN and compress it within 1 accuracy point",
        description="The whole pipeline on the built-in digits CNN: train or load it, search ranks within a "
                    "one-point validation-accuracy tolerance, report before/after accuracy, size and MACs.")
    parser.add_argument("--json", metavar="OUT", help="also write the summary as JSON to OUT")
    parser.add_argument("--tolerance", default="0.01", help="accuracy tolerance (default 0.01 = one point)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the evaluation cache")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..files import atomic_write_json
    from ..models import load_builtin
    from ..search import compress
    from ..search.evaluate import single_threaded
    from .compress import parse_tolerance, print_report

    tolerance = parse_tolerance(args.tolerance)
    start = time.perf_counter()
    with single_threaded():  # a tiny model: one thread is as fast, and far faster on a busy machine
        model, splits = load_builtin("digits-cnn", progress=not args.quiet)
    loaded = time.perf_counter() - start
    print(f"digits CNN on {splits.name}: {len(splits.train)} train / {len(splits.val)} validation / "
          f"{len(splits.test)} test images, one validation image = {100 / len(splits.val):.2f} accuracy points "
          f"({loaded:.1f} s to train or load)")
    result = compress(model, splits, tolerance=tolerance, cache=not args.no_cache, progress=not args.quiet)
    print_report(result)
    total = time.perf_counter() - start
    summary = result.summary()
    o, c = summary["original"], summary["compressed"]
    print(f"\ndemo: {format_count(o['params'])} -> {format_count(c['params'])} parameters, "
          f"{format_count(o['macs'])} -> {format_count(c['macs'])} MACs, {format_bytes(o['bytes'])} -> "
          f"{format_bytes(c['bytes'])}, in {total:.1f} s")
    if args.json:
        summary.update({"model": "builtin:digits-cnn", "data": "builtin:digits", "seconds_total": round(total, 3),
                        "seconds_model": round(loaded, 3)})
        atomic_write_json(args.json, summary)
        print(f"wrote {args.json}")
    return 0
