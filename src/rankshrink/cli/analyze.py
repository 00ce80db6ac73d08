"""``rankshrink analyze``: per-layer costs, spectra and break-even ranks."""

from __future__ import annotations

import argparse

from .common import add_model_arguments, check_input_paths, format_count, print_table
from .inputs import example_batch, load_model, parse_shape


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze", help="per-layer table: shapes, params, MACs, break-even ranks, singular-value energy",
        description="Analyse a model: what each layer costs and how compressible its weights are.")
    add_model_arguments(parser, model_default="builtin:digits-cnn")
    parser.add_argument("--data", help="data SPEC for the example input (builtin:digits, mnist:DIR, "
                                       "cifar10:DIR, synthetic:cifar); default: the model's own")
    parser.add_argument("--input-shape", help="per-sample input shape, e.g. 1,28,28 (instead of --data)")
    parser.add_argument("--json", metavar="OUT", help="also write the full analysis as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..analysis import analyze
    from ..files import atomic_write_json

    check_input_paths(args)  # every option and path before any work
    if args.input_shape:
        parse_shape(args.input_shape)
    model = load_model(args)
    batch = example_batch(args, model)
    result = analyze(model, batch)
    rows = []
    for layer in result.layers:
        be = "/".join(str(layer.break_even[m]["params"]) for m in layer.methods)
        rows.append([layer.name, layer.type, "×".join(map(str, layer.weight_shape)), format_count(layer.params),
                     format_count(layer.macs), f"{'/'.join(layer.methods)}: {be}",
                     layer.rank_for_energy["90%"], layer.rank_for_energy["99%"], len(layer.singular_values)])
    print_table(["layer", "type", "weight shape", "params", "MACs", "break-even rank (params)", "r@90%E",
                 "r@99%E", "full"], rows)
    print(f"\ntotal: {format_count(result.cost.params)} params, {format_count(result.cost.bytes)}B, "
          f"{format_count(result.cost.macs)} MACs per sample")
    for name, reason in result.skipped:
        print(f"skipped {name}: {reason}")
    if args.json:
        atomic_write_json(args.json, result.to_dict())
        print(f"wrote {args.json}")
    return 0
