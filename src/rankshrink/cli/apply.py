"""``rankshrink apply``: factorize a model by a plan file and save the result."""

from __future__ import annotations

import argparse
import sys
import warnings

from .common import (
    add_command,
    add_layer_arguments,
    add_model_arguments,
    add_output_options,
    add_report_option,
    check_input_paths,
    format_count,
    layer_patterns,
    print_table,
    set_result,
    write_run_report,
    writes_output_dir,
)


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "apply", help="factorize the layers a plan names and save the compressed model",
        description="Apply a plan (JSON: layer -> method, rank) to a model; write model.safetensors, "
                    "plan.json, summary.json and report.html to --out. The input model file is never modified. The "
                    "outputs appear together or not at all: summary.json, written last, records the seed and the "
                    "sha256 of the others.",
        examples=["rankshrink apply --model builtin:digits-cnn --plan out/plan.json --out again/",
                  "rankshrink apply --model my_model.py:make --weights w.safetensors --plan plan.json "
                  "--data mnist:~/mnist --out applied/",
                  "rankshrink apply --model builtin:digits-cnn --plan plan.json --fit weights --out w/ --json"])
    add_model_arguments(parser)
    parser.add_argument("--plan", required=True, help="plan JSON file (see docs/ARCHITECTURE.md)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="allow a non-empty --out (replaces our files only)")
    from .inputs import add_data_arguments

    add_data_arguments(parser, data_help="data SPEC: calibration data for entries fitted to activations (their "
                                         "training split, drawn as the plan records), and the size report; "
                                         "default: a built-in model's own")
    add_layer_arguments(parser)
    parser.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=True,
                        help="fold eval-mode BatchNorm into the conv/Linear before it first, as compress does "
                             "(default: on; a plan that records its folds keeps them)")
    parser.add_argument("--fit", "--objective", dest="fit", choices=("weights", "activations"),
                        help="re-fit every entry to the weights or to the activations (default: as the plan says)")
    parser.add_argument("--seed", type=int,
                        help="seed for randomized factorizations (CP, randomized SVD), replacing the plan's")
    add_output_options(parser)
    add_report_option(parser)
    parser.set_defaults(func=run)


@writes_output_dir
def run(args: argparse.Namespace) -> int:
    from ..cost import count
    from ..errors import ConfigError
    from ..files import check_output_dir, output_set, recover_output_dir
    from ..layers import batchnorm_folds, select_layers
    from ..methods import FactorizationWarning
    from ..plan import Plan
    from ..surgery import apply, fold_batchnorm, folding_preserves_outputs, save
    from .inputs import default_data_spec, example_batch, load_data_from_args, load_model, parse_shape

    check_input_paths(args)  # every option and path before any work
    if args.input_shape:
        parse_shape(args.input_shape)
    plan = Plan.load(args.plan)
    include, exclude = layer_patterns(args)
    recover_output_dir(args.out)  # we hold --out's lock: finish what a killed earlier run left, then check
    check_output_dir(args.out, force=args.force)
    if args.fit is not None:
        plan = plan.with_fit(args.fit)
    spec = args.data or default_data_spec(args.model)
    if plan.activation_layers and spec is None:
        raise ConfigError(f"the plan fits {len(plan.activation_layers)} layer(s) to activations, which needs "
                          "calibration data: pass --data SPEC (the data the plan was made with), or re-fit "
                          "them to the weights with --fit weights.")
    data = load_data_from_args(args, spec) if spec else None
    model = load_model(args, data)
    if include is not None or exclude is not None:
        plan = plan.only(select_layers(list(plan), include, exclude))
    if args.seed is not None:
        plan = plan.with_options(seed=args.seed)
    try:
        batch = example_batch(args, model, data)
    except ConfigError:
        batch = None
    if not args.fold_bn:
        plan = plan.with_folds([])
    elif not plan.fold_batchnorm and (folds := batchnorm_folds(model)):
        if batch is None or folding_preserves_outputs(model, fold_batchnorm(model, folds), batch):
            plan = plan.with_folds(folds)
        else:
            print("rankshrink apply: warning: folding BatchNorm changed the model's outputs; the BatchNorm layers "
                  "are kept (--no-fold-bn silences this).", file=sys.stderr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FactorizationWarning)
        compressed = apply(model, plan, data=data if plan.activation_layers else None, progress=not args.quiet,
                           example_input=batch)  # validates the whole plan first
    for warning in caught:
        if issubclass(warning.category, FactorizationWarning):
            print(f"rankshrink apply: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    summary = {"format": "rankshrink-apply-summary", "version": 1, "model": args.model, "weights": args.weights,
               "seed": _seed_of(plan), "fit": args.fit, "data": args.data, "plan": plan.to_dict()}
    if batch is not None:
        before, after = count(model, batch), count(compressed, batch)
        summary.update(original=before.to_dict(), compressed=after.to_dict())
        rows = [[row.name, row.type, row.method or "dense", row.rank or "", format_count(row.params),
                 format_count(row.macs)] for row in after.layers]
        print_table(["layer", "replaces", "method", "rank", "params", "MACs"], rows)
        print(f"\nparams {format_count(before.params)} -> {format_count(after.params)} "
              f"({before.params / after.params:.2f}x smaller), MACs {format_count(before.macs)} -> "
              f"{format_count(after.macs)} ({before.macs / max(after.macs, 1):.2f}x fewer)")
    if plan.fold_batchnorm:
        print(f"folded BatchNorm: {', '.join(f'{bn} into {layer}' for layer, bn in plan.fold_batchnorm)}")
    from ..report_data import enrich_summary

    enrich_summary(summary, original=model, compressed=compressed, plan=plan.to_dict()["layers"],
                   example_input=batch, argv=args.argv, data_spec=args.data, model_spec=args.model,
                   weights=args.weights, seed=summary["seed"], splits=data, measure=False)
    with output_set(args.out, force=args.force, summary=summary) as staging:
        save(compressed, plan, staging)
    report = write_run_report(args, args.out)
    print(f"wrote {args.out}/model.safetensors, plan.json, summary.json" + (", report.html" if report else ""))
    set_result(args, {**summary, "out": str(args.out), "report": report})
    return 0


def _seed_of(plan):
    """The seed the plan's factorizations use (a list when its entries differ; 0 for an empty plan)."""
    seeds = sorted({entry.seed for entry in plan.layers.values()})
    return seeds[0] if len(seeds) == 1 else (seeds or 0)
