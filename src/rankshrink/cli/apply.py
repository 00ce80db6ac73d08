"""``rankshrink apply``: factorize a model by a plan file and save the result."""

from __future__ import annotations

import argparse

from .common import (
    add_command,
    add_model_arguments,
    add_output_options,
    add_report_option,
    check_input_paths,
    format_count,
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
    parser.add_argument("--data", help="data SPEC: calibration data for entries fitted to activations (their "
                                       "training split, drawn as the plan records), and the size report; "
                                       "default: a built-in model's own")
    parser.add_argument("--input-shape", help="per-sample input shape for the size report, e.g. 1,28,28")
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
    from ..plan import Plan
    from ..surgery import apply, save
    from .inputs import default_data_spec, example_batch, load_model, parse_shape

    check_input_paths(args)  # every option and path before any work
    if args.input_shape:
        parse_shape(args.input_shape)
    plan = Plan.load(args.plan)
    recover_output_dir(args.out)  # we hold --out's lock: finish what a killed earlier run left, then check
    check_output_dir(args.out, force=args.force)
    model = load_model(args)
    if args.fit is not None:
        plan = plan.with_fit(args.fit)
    if args.seed is not None:
        plan = plan.with_options(seed=args.seed)
    data = None
    if plan.activation_layers:
        spec = args.data or default_data_spec(args.model)
        if spec is None:
            raise ConfigError(f"the plan fits {len(plan.activation_layers)} layer(s) to activations, which needs "
                              "calibration data: pass --data SPEC (the data the plan was made with), or re-fit "
                              "them to the weights with --fit weights.")
        from ..data import load_data

        data = load_data(spec)
    compressed = apply(model, plan, data=data, progress=not args.quiet)  # validates the whole plan first
    try:
        batch = example_batch(args, model)
    except ConfigError:
        batch = None
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
