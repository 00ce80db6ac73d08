"""``rankshrink analyze``: per-layer costs, spectra and break-even ranks."""

from __future__ import annotations

import argparse

from .common import (
    add_command,
    add_model_arguments,
    add_output_options,
    check_input_paths,
    format_count,
    print_table,
    set_result,
)
from .inputs import example_batch, load_model, parse_shape


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "analyze", help="per-layer table: shapes, params, MACs, break-even ranks, singular-value energy",
        description="Analyse a model: what each layer costs and how compressible its weights are.",
        examples=["rankshrink analyze --model builtin:digits-cnn",
                  "rankshrink analyze --model my_model.py:make --weights w.safetensors --input-shape 3,32,32",
                  "rankshrink analyze --model builtin:cifar-cnn --json > analysis.json"])
    add_model_arguments(parser, model_default="builtin:digits-cnn")
    parser.add_argument("--data", help="data SPEC for the example input (builtin:digits, mnist:DIR, "
                                       "cifar10:DIR, synthetic:cifar); default: the model's own")
    parser.add_argument("--input-shape", help="per-sample input shape, e.g. 1,28,28 (instead of --data)")
    parser.add_argument("--out", metavar="FILE", help="write the full analysis as JSON to FILE (as --json FILE)")
    add_output_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..analysis import analyze

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
    data = result.to_dict()
    if args.out:
        from ..files import atomic_write_json

        atomic_write_json(args.out, data)
        print(f"wrote {args.out}")
    set_result(args, data)
    return 0
