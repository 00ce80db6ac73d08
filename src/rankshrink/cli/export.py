"""``rankshrink export``: ONNX file, ONNX Runtime latency, and the no-slower-layer check."""

from __future__ import annotations

import argparse

from .common import add_command, add_model_arguments, add_output_options, check_input_paths, print_table, set_result


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "export", help="export to ONNX and measure latency on ONNX Runtime",
        examples=["rankshrink export --model builtin:digits-cnn --out model.onnx",
                  "rankshrink export --model builtin:digits-cnn --compressed out/ --out small.onnx --batch 32",
                  "rankshrink export --model builtin:digits-cnn --compressed out/ --out small.onnx "
                  "--drop-slower faster_plan.json --json"],
        description="Export a (compressed) model to ONNX, verified against PyTorch, and time it on "
                    "ONNX Runtime next to the original. With --compressed DIR (written by compress/apply) "
                    "each factorized layer is also timed against the dense layer it replaced, and "
                    "--drop-slower writes a plan without the layers that did not get faster.")
    add_model_arguments(parser)
    parser.add_argument("--compressed", metavar="DIR", help="directory with model.safetensors + plan.json")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    from .inputs import add_data_arguments

    add_data_arguments(parser, data_help="data SPEC for the example input (default: the model's own)")
    parser.add_argument("--batch", type=int, default=1, help="batch size for latency (default 1)")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per model (default 50)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--drop-slower", metavar="PLAN_OUT",
                        help="write the plan without factorized layers that ran slower than dense")
    add_output_options(parser, progress=False)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..deploy import drop_slower_layers, export_onnx, layer_latencies, onnx_latency
    from ..errors import ConfigError
    from ..inputs import map_tensors
    from ..surgery import PLAN_FILE, load
    from .inputs import default_data_spec, example_batch, load_data_from_args, load_model, parse_shape

    if args.batch < 1 or args.runs < 1 or args.threads < 1:
        raise ConfigError("--batch, --runs and --threads must be at least 1.")
    check_input_paths(args)  # every option and path before any work
    if args.input_shape:
        parse_shape(args.input_shape)
    spec = args.data or default_data_spec(args.model)
    splits = load_data_from_args(args, spec) if spec else None
    original = load_model(args, splits)
    if args.compressed:
        from ..files import verify_output_set
        verify_output_set(args.compressed)  # a set cut short by a killed run is refused, not half-read
    model = load(original, args.compressed) if args.compressed else original
    example = example_batch(args, original, splits)
    batch = map_tensors(lambda t: t.expand(args.batch, *t.shape[1:]).contiguous(), example)
    export_onnx(model, batch, args.out)
    print(f"wrote {args.out} (outputs checked against PyTorch on ONNX Runtime)")
    models = {"original": original, "compressed": model} if args.compressed else {"model": model}
    latency = onnx_latency(models, batch, runs=args.runs, threads=args.threads)
    for name, value in latency.items():
        print(f"{name}: median {value.median_ms:.3f} ms, p90 {value.p90_ms:.3f} ms, fastest {value.fastest_ms:.3f} ms "
              f"over {value.runs} runs "
              f"(batch {args.batch}, {args.threads} thread(s))")
    result: dict = {"onnx": str(args.out), "batch": args.batch, "threads": args.threads,
                    "latency_ms": {name: {"median": v.median_ms, "p90": v.p90_ms, "fastest": v.fastest_ms,
                                          "runs": v.runs} for name, v in latency.items()}}
    set_result(args, result)
    if args.compressed:
        speeds = layer_latencies(original, model, batch, runs=args.runs, threads=args.threads)
        result["layers"] = [s.to_dict() for s in speeds]
        print_table(["layer", "method", "rank", "dense ms", "factorized ms", "speed-up"],
                    [[s.name, s.method, s.rank, f"{s.dense_ms:.4f}", f"{s.factorized_ms:.4f}",
                      f"{s.speedup:.2f}x"] for s in speeds])
        if args.drop_slower:
            from ..plan import Plan
            plan = Plan.load(f"{args.compressed}/{PLAN_FILE}")
            kept, _ = drop_slower_layers(original, plan, batch, compressed=model, runs=args.runs,
                                         threads=args.threads)
            kept.save(args.drop_slower)
            dropped = kept.metadata.get("dropped_as_slower", [])
            print(f"wrote {args.drop_slower}: {len(kept)} layers kept"
                  + (f", dropped as slower: {', '.join(dropped)}" if dropped else ""))
            result.update(drop_slower=str(args.drop_slower), dropped_as_slower=list(dropped))
    return 0
