"""``rankshrink analyze``: per-layer costs, spectra and break-even ranks."""

from __future__ import annotations

import argparse

from .common import (
    add_command,
    add_layer_arguments,
    add_model_arguments,
    add_output_options,
    check_input_paths,
    format_count,
    layer_patterns,
    print_table,
    set_result,
)
from .inputs import add_data_arguments, default_data_spec, example_batch, load_data_from_args, load_model, parse_shape


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "analyze", help="per-layer table: shapes, params, MACs, break-even ranks, singular-value energy",
        description="Analyse a model: what each layer costs and how compressible its weights are. Every op that "
                    "multiplies is counted: layers without a formula are measured and listed as 'not counted'.",
        examples=["rankshrink analyze --model builtin:digits-cnn",
                  "rankshrink analyze --model my_model.py:make --weights w.safetensors --input-shape 3,32,32",
                  "rankshrink analyze --model builtin:cifar-cnn --json > analysis.json"])
    add_model_arguments(parser, model_default="builtin:digits-cnn")
    add_data_arguments(parser, data_help="data SPEC for the example input (builtin:digits, PATH.npz, file.py:function, "
                                         "imagefolder:DIR, mnist:DIR, cifar10:DIR, synthetic:cifar); default: the "
                                         "model's own")
    add_layer_arguments(parser)
    parser.add_argument("--out", metavar="FILE", help="write the full analysis as JSON to FILE (as --json FILE)")
    add_output_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..analysis import analyze

    check_input_paths(args)  # every option and path before any work
    if args.input_shape:
        parse_shape(args.input_shape)
    spec = args.data or default_data_spec(args.model)
    splits = load_data_from_args(args, spec) if spec else None
    model = load_model(args, splits)
    batch = example_batch(args, model, splits)
    include, exclude = layer_patterns(args)
    result = analyze(model, batch, layers=include, exclude=exclude)
    rows = []
    for layer in result.layers:
        be = "/".join(str(layer.break_even[m]["params"]) for m in layer.methods)
        rows.append([layer.name, layer.type, "×".join(map(str, layer.weight_shape)), format_count(layer.params),
                     format_count(layer.macs), f"{'/'.join(layer.methods)}: {be}",
                     layer.rank_for_energy["90%"], layer.rank_for_energy["99%"], len(layer.singular_values)])
    print_table(["layer", "type", "weight shape", "params", "MACs", "break-even rank (params)", "r@90%E",
                 "r@99%E", "full"], rows)
    cost = result.cost
    if cost.others or cost.not_counted:
        print()
        extra = [[o.name, o.type, format_count(o.params), format_count(o.macs), o.reason] for o in cost.others]
        extra += [[m.name or "(model)", m.type or "-", "", format_count(m.macs),
                   f"not counted by formula: {', '.join(m.ops)} measured by FlopCounterMode"] for m in cost.not_counted]
        print_table(["not factorized", "type", "params", "MACs", "why"], extra)
    print(f"\ntotal: {format_count(cost.params)} params, {format_count(cost.bytes)}B, "
          f"{format_count(cost.macs)} MACs per sample")
    for group in result.tied:
        print(f"tied: {', '.join(group)} share one weight (kept dense: factorizing one would untie them)")
    for names in result.shared:
        print(f"shared: one module under the names {', '.join(names)} (factorized once, everywhere)")
    listed = {o.name for o in cost.others}
    for name, reason in result.skipped:
        if name not in listed and not any(name.startswith(f"{other}.") for other in listed):
            print(f"skipped {name}: {reason}")
    data = result.to_dict()
    if args.out:
        from ..files import atomic_write_json

        atomic_write_json(args.out, data)
        print(f"wrote {args.out}")
    set_result(args, data)
    return 0
