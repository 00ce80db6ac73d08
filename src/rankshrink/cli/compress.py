"""``rankshrink compress``: search ranks/methods for a model and save the compressed model.

Exactly one target: ``--tolerance`` (largest validation-metric drop, e.g. 0.01 or
1%), or a hard budget ``--max-macs`` / ``--max-params`` / ``--max-bytes``. Budget
values: a ratio of the original (``0.5`` or ``50%``; any value up to 1) or an
absolute amount (a number above 1: ``120000``, ``1.2M``, ``350k``; bytes also
``256KB``, ``1.5MB``, ``2MiB``).

Latency (ONNX Runtime, CPU provider; ``--batch 1,32``, ``--threads 1``): by default every
candidate is measured against its dense layer and only faster ones are picked, ranks are rounded
to multiples of 8 where that measures faster, and no plan measured slower than the original at
a requested batch size is saved (``--ignore-latency`` turns this off, ``--allow-slower`` keeps a
slower plan). ``--minimize latency`` and ``--max-latency 0.6`` / ``2ms`` target latency itself.

Writes ``--out``/plan.json, model.safetensors, model.onnx (verified against PyTorch on real
inputs; ``--no-export`` skips it), model.int8.onnx (with ``--int8``) and summary.json as one set
(:func:`rankshrink.files.output_set`): staged in a sibling directory and moved into
place when complete, so an interrupted run leaves nothing half-written in ``--out``;
summary.json records the other files' checksums. One writer at a time: a second rankshrink
writing the same ``--out`` exits 1 naming the first one's pid. Evaluations finished before an
interruption are cached, and rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .common import (
    add_command,
    add_layer_arguments,
    add_model_arguments,
    add_output_options,
    add_report_option,
    check_cache_and_out,
    check_input_paths,
    check_training_options,
    format_bytes,
    format_count,
    layer_patterns,
    parse_bytes,
    parse_ratio,
    print_table,
    set_result,
    write_run_report,
    writes_output_dir,
)

_COUNT_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}
METRICS = ("auto", "accuracy", "agreement", "per-class", "worst-class", "cosine", "mse", "kl")


def parse_tolerance(text: str) -> float:
    """'0.01' or '1%' -> 0.01; must lie in [0, 1)."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ConfigError(f"--tolerance must be a number like 0.01 or 1%, got {text!r}.") from None
    if not 0 <= value < 1:
        raise ConfigError(f"--tolerance must lie in [0, 1) (0.01 = one accuracy point), got {text!r}.")
    return value


def parse_amount(text: str, what: str) -> float:
    """A ratio ('0.5', '50%', anything up to 1) or an absolute count ('120000', '1.2M', '350k')."""
    raw = text.strip()
    if raw.endswith("%"):
        return parse_ratio(raw, what)
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgG]?)", raw)
    if not match:
        raise ConfigError(f"{what} must be a ratio (0.5, 50%) or a count (120000, 1.2M), got {text!r}.")
    return _budget_value(float(match.group(1)) * _COUNT_UNITS[match.group(2).upper()], text, what,
                         unit=bool(match.group(2)))


def _budget_value(value: float, text: str, what: str, *, unit: bool) -> float:
    """A budget is a ratio in (0, 1] or a whole count above 1; anything else is refused, never truncated."""
    if not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, got {text!r}.")
    if value <= 0:
        raise ConfigError(f"{what} must be positive, got {text!r}.")
    if value <= 1:
        return value
    if not unit and value != int(value):
        # 1.5 is neither a ratio (at most 1) nor a count: truncating it to 1 would mean "the whole model"
        raise ConfigError(f"{what} {text.strip()} is above 1, so it would be a count, but counts are whole numbers; "
                          "for a ratio of the original use a value up to 1 (0.5 or 50%), for a count a whole "
                          "number (120000, 1.2M).")
    return float(int(value))


def parse_byte_budget(text: str) -> float:
    raw = text.strip()
    if raw.endswith("%"):
        return parse_ratio(raw, "--max-bytes")
    try:
        value = float(raw)
    except ValueError:
        return float(parse_bytes(raw, "--max-bytes"))
    return _budget_value(value, text, "--max-bytes", unit=False)


def parse_confidence(text: str) -> float:
    """'0.95' or '95%' -> 0.95; must lie strictly between 0 and 1."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ConfigError(f"--confidence must be a level like 0.95 or 95%, got {text!r}.") from None
    if not 0 < value < 1:
        raise ConfigError(f"--confidence must lie strictly between 0 and 1 (e.g. 0.95), got {text!r}.")
    return value


def parse_latency(text: str) -> dict:
    """'0.6' or '60%' -> {'latency': 0.6} (a ratio of the original's latency); '2ms', '500us', '0.002s' ->
    {'latency_ms': 2.0} (absolute, at the first --batch size)."""
    raw = text.strip().lower()
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(ms|us|µs|s)", raw)
    if match:
        value = float(match.group(1)) * {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}[match.group(2)]
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"--max-latency must be a positive time, got {text!r}.")
        return {"latency_ms": value}
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ConfigError(f"--max-latency must be a ratio of the original's latency (0.6, 60%) or a time (2ms, "
                          f"500us), got {text!r}.") from None
    if not math.isfinite(value) or not 0 < value <= 1:
        raise ConfigError(f"--max-latency {text.strip()} is not a ratio in (0, 1]; for a time give a unit (2ms, "
                          "500us).")
    return {"latency": value}


def parse_batches(text: str) -> tuple[int, ...]:
    """'1,32' -> (1, 32)."""
    try:
        batches = tuple(int(part) for part in re.split(r"[,\s]+", text.strip()) if part)
    except ValueError:
        batches = ()
    if not batches or any(b < 1 for b in batches):
        raise ConfigError(f"--batch takes positive batch sizes separated by commas (1,32), got {text!r}.")
    return tuple(dict.fromkeys(batches))


def parse_dynamic_axes(values: list[str] | None) -> dict[str, tuple[int, ...]]:
    """['input_ids:1', 'attention_mask:1'] -> {'input_ids': (1,), 'attention_mask': (1,)}."""
    axes: dict[str, tuple[int, ...]] = {}
    for value in values or []:
        for part in (p for p in value.split(",") if p.strip()):
            name, sep, axis = part.strip().rpartition(":")
            if not sep or not name or not axis.isdigit() or int(axis) < 1:
                raise ConfigError(f"--dynamic-axis takes INPUT:AXIS with AXIS 1 or more (input_ids:1; axis 0, the "
                                  f"batch, is always dynamic), got {part.strip()!r}.")
            axes[name] = tuple(dict.fromkeys((*axes.get(name, ()), int(axis))))
    return axes


def parse_methods(text: str) -> list[str]:
    from ..methods import method_names

    methods = [m.strip().lower() for m in re.split(r"[,\s]+", text) if m.strip()]
    unknown = [m for m in methods if m not in method_names()]
    if not methods or unknown:
        raise ConfigError(f"--methods takes a comma-separated list of {', '.join(method_names())}; "
                          f"got {text!r}.")
    return methods


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "compress", help="find the smallest ranks within a tolerance, or the best model within a budget",
        description="Search every layer's factorization method and rank, then save the compressed model. "
                    "The tolerance is enforced on the validation split; test accuracy is only reported. "
                    "Budgets: a value up to 1 (or with %%) is a ratio of the original, above 1 an absolute "
                    "count (1.2M, 350k) or size (256KB, 1.5MB). Writes plan.json, model.safetensors, summary.json "
                    "and report.html to --out.",
        examples=["rankshrink compress --model builtin:digits-cnn --tolerance 1% --out out/",
                  "rankshrink compress --model my_model.py:make --weights w.safetensors --data mnist:~/mnist "
                  "--max-macs 30% --out out/",
                  "rankshrink compress --model builtin:cifar-cnn --max-bytes 256KB --finetune 3 --distill "
                  "--out small/ --json > small.json"])
    add_model_arguments(parser)
    from .inputs import add_data_arguments

    add_data_arguments(parser)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--tolerance", help="largest allowed validation-metric drop: 0.01 or 1%%")
    target.add_argument("--max-macs", help="MAC budget: ratio (0.5, 50%%) or count (1.2M)")
    target.add_argument("--max-params", help="parameter budget: ratio (0.5, 50%%) or count (120000, 120k); "
                        "50%%-of-factorizable is a ratio of what can be factorized (see --budget-of)")
    target.add_argument("--max-bytes", help="size budget: 256KB, 1.5MB, 2MiB, a byte count, or a ratio (50%%); "
                        "counts the shipped file (model.onnx, with --int8 model.int8.onnx; with --no-export the "
                        "parameter bytes)")
    target.add_argument("--max-latency", help="latency budget on ONNX Runtime: a ratio of the original's measured "
                        "latency at every --batch size (0.6, 60%%) or a time at the first one (2ms, 500us)")
    parser.add_argument("--metric", default="auto", choices=METRICS,
                        help="what the tolerance is measured in: auto (accuracy with labels; without: agreement for "
                             "logits, cosine for other outputs), agreement (with the original's predictions), "
                             "cosine / mse / kl (label-free comparisons with the original's outputs; an encoder's "
                             "mask-mean-pooled last hidden state); the tolerance is the drop from the original")
    parser.add_argument("--minimize", default="macs", choices=("macs", "params", "bytes", "latency"),
                        help="what --tolerance mode makes smallest (default: macs; latency: measured on ONNX "
                             "Runtime)")
    from ..methods import method_names
    from ..search.config import FIT_CHOICES

    parser.add_argument("--methods", help=f"comma-separated subset of {','.join(method_names())} (default: all)")
    parser.add_argument("--fit", "--objective", dest="fit", default="auto", choices=FIT_CHOICES,
                        help="factor fit: activations (data-aware, the default with data) or weights "
                             "(--objective is an alias)")
    add_layer_arguments(parser)
    parser.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=True,
                        help="fold eval-mode BatchNorm into the conv/Linear before it first (default: on)")
    parser.add_argument("--min-baseline", type=float, metavar="VALUE",
                        help="stop unless the original model's validation metric reaches VALUE (0..1; default: "
                             "clearly above chance; 0 turns the check off)")
    parser.add_argument("--sensitivity", default="auto", choices=("auto", "probe", "proxy"),
                        help="tolerance mode: auto (proxy-ordered, every evaluation on whole models), probe "
                             "(one-layer bisections first) or proxy (at most 10 whole-model evaluations)")
    parser.add_argument("--confidence", default=None,
                        help="apply --tolerance to the upper end of the drop's paired bootstrap interval at this "
                             "level (e.g. 0.95) instead of the measured drop")
    parser.add_argument("--budget-of", choices=("model", "factorizable"), default=None,
                        help="what a ratio budget is a ratio of: the whole model (default) or the layers the search "
                             "can factorize (everything else stays as it is)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="evaluate independent probes and plans on N local Ray workers (needs ray)")
    parser.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="join the Ray cluster at ADDR instead of starting a local one")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None,
                        help="where calibration, evaluation and fine-tuning run (default: where the model is)")
    deploy = parser.add_argument_group("latency and deployment (ONNX Runtime, CPU execution provider)")
    deploy.add_argument("--batch", default="1,32", metavar="SIZES",
                        help="batch sizes latency is measured and judged at (default 1,32)")
    deploy.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    deploy.add_argument("--ignore-latency", action="store_true",
                        help="do not measure candidates and plans: MACs alone decide, and a plan slower than the "
                             "original may be saved")
    deploy.add_argument("--rank-multiple", type=int, default=8, metavar="N",
                        help="latency-aware ranks are rounded to multiples of N where that measures faster "
                             "(default 8; 1: no rounding)")
    deploy.add_argument("--allow-slower", action="store_true",
                        help="save the plan found even when it measures slower than the original")
    deploy.add_argument("--no-export", action="store_true", help="do not write model.onnx (nor measure latency_ms)")
    deploy.add_argument("--int8", choices=("dynamic", "static"),
                        help="also write model.int8.onnx: dynamic (Linear-heavy models) or static QDQ calibrated on "
                             "the training data (convolutional ones; nodes whose int8 kernel measures slower on "
                             "ONNX Runtime stay float32); the search then judges whole plans as int8 files")
    deploy.add_argument("--int8-everywhere", action="store_true",
                        help="with --int8 static: quantize every node, even where int8 measures slower (always so "
                             "with --max-bytes, which sizes the every-node int8 file)")
    deploy.add_argument("--dynamic-axis", action="append", metavar="INPUT:AXIS",
                        help="declare a further dynamic axis of an input (input_ids:1), so a sequence model is not "
                             "frozen at one length; repeatable (text: data declare axis 1 of every input)")
    deploy.add_argument("--allow-traced-branches", action="store_true",
                        help="export even when the tracer warns of data-dependent control flow (the graph is "
                             "still checked on real inputs; on for transformers models, whose masking code branches "
                             "on sequence lengths)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="allow a non-empty --out (replaces our files only)")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--cache", help="evaluation cache directory (default: the user cache dir)")
    cache.add_argument("--no-cache", action="store_true", help="do not read or write the evaluation cache")
    parser.add_argument("--seed", type=int, default=0, help="seed for factorizations and calibration sampling")
    parser.add_argument("--calibration-samples", type=int, default=512, metavar="N",
                        help="training samples whose layer inputs the activation fits use (default 512)")
    add_output_options(parser)
    add_report_option(parser)
    from .finetune import add_recovery_arguments

    add_recovery_arguments(parser)  # --finetune EPOCHS [--distill] [--finetune-lr ...]
    parser.set_defaults(func=run)


_OF_SUFFIX = re.compile(r"^(.*?)\s*-?\s*of[-\s]*(model|factorizable)\s*$", re.IGNORECASE)


def _target(args: argparse.Namespace) -> dict:
    if args.tolerance is not None:
        if getattr(args, "budget_of", None):
            raise ConfigError("--budget-of applies to a budget (--max-macs, --max-params, --max-bytes), not to "
                              "--tolerance.")
        return {"tolerance": parse_tolerance(args.tolerance)}
    if args.max_latency is not None:
        if getattr(args, "budget_of", None):
            raise ConfigError("--budget-of applies to --max-macs, --max-params and --max-bytes; --max-latency is a "
                              "ratio of the whole model's measured latency.")
        return {"budget": parse_latency(args.max_latency)}
    for kind, option in (("macs", "max_macs"), ("params", "max_params"), ("bytes", "max_bytes")):
        text = getattr(args, option)
        if text is None:
            continue
        what = "--" + option.replace("_", "-")
        of = getattr(args, "budget_of", None)
        match = _OF_SUFFIX.match(text.strip())
        if match:  # 50%-of-factorizable
            if of is not None and of != match.group(2).lower():
                raise ConfigError(f"{what} {text} and --budget-of {of} disagree; give one of them.")
            text, of = match.group(1), match.group(2).lower()
        value = parse_byte_budget(text) if kind == "bytes" else parse_amount(text, what)
        budget: dict = {kind: value}
        if of is not None and of != "model":
            if value > 1:
                raise ConfigError(f"{what} {text} is a count; 'of {of}' applies to a ratio (50%-of-{of}).")
            budget["of"] = of
        return {"budget": budget}
    raise ConfigError("give --tolerance or one of --max-macs, --max-params, --max-bytes, --max-latency.")


def check_parallel_options(args: argparse.Namespace) -> None:
    """``--workers N`` / ``--ray-address``: a positive count, and Ray installed (else how to install it)."""
    from ..validation import check_optional_int

    check_optional_int(args.workers, "--workers", minimum=1)
    if (args.workers or 1) > 1 or args.ray_address is not None:
        try:
            import ray  # noqa: F401
        except ImportError:
            from ..search.parallel import RAY_HINT

            raise ConfigError(f"--workers/--ray-address evaluate on Ray, which is not installed: {RAY_HINT}.") from None


def check_recovery_options(args: argparse.Namespace) -> None:
    """``--finetune EPOCHS`` and its ``--finetune-*``/``--distill-*`` options, checked before the search."""
    if args.finetune < 0:
        raise ConfigError(f"--finetune must be a non-negative number of epochs, got {args.finetune}.")
    if args.finetune == 0 and args.distill:
        raise ConfigError("--distill only applies with --finetune EPOCHS (EPOCHS > 0).")
    check_training_options(args, prefix="finetune-")


def write_outputs(model, plan, summary: dict, out: str | os.PathLike, *, force: bool, deploy=None) -> Path:
    """Save weights, plan.json and summary.json as one all-or-nothing set (``files.output_set``).

    A new (or empty) ``out`` appears in one rename; with ``force`` on a non-empty ``out``
    the files are moved in with summary.json, the completion marker, last, and a killed
    run is rolled forward by the next writer of ``out`` (readers only check). summary.json
    records every other file's sha256 and size (``files.verify_output_set`` checks them).
    ``deploy(stage) -> dict`` writes the ONNX files into the set and returns what summary.json
    adds about them (an error there leaves ``out`` untouched).
    """
    from ..files import output_set
    from ..surgery import save

    out = Path(out)
    with output_set(out, force=force, summary=summary) as stage:
        save(model, plan, stage)
        if deploy is not None:
            summary.update(deploy(stage))
    return out


def _deploy_options(args: argparse.Namespace):
    """The export and latency options, checked before any work: (ExportConfig or None, batches, dynamic axes)."""
    from ..validation import check_int

    batches = parse_batches(args.batch)
    check_int(args.threads, "--threads", minimum=1)
    check_int(args.rank_multiple, "--rank-multiple", minimum=1)
    axes = parse_dynamic_axes(args.dynamic_axis)
    if args.no_export:
        for flag, given in (("--int8", args.int8), ("--int8-everywhere", args.int8_everywhere),
                            ("--dynamic-axis", args.dynamic_axis),
                            ("--allow-traced-branches", args.allow_traced_branches)):
            if given:
                raise ConfigError(f"{flag} applies to the exported model.onnx; drop it or drop --no-export.")
    measured = not args.ignore_latency or args.minimize == "latency" or args.max_latency is not None
    if args.ignore_latency and (args.minimize == "latency" or args.max_latency is not None):
        raise ConfigError("--ignore-latency contradicts --minimize latency / --max-latency, which measure it.")
    if measured or not args.no_export:
        from ..deploy.onnx import require_onnxruntime

        require_onnxruntime()  # an install hint before any work
    if args.int8_everywhere and args.int8 != "static":
        raise ConfigError("--int8-everywhere applies to --int8 static (dynamic quantizes every matrix product); "
                          "add --int8 static or drop it.")
    if args.int8:
        from ..deploy.quantize import _require_quantization

        _require_quantization()
    if args.no_export:
        return None, batches, axes
    from ..deploy.package import ExportConfig

    # A byte budget is checked on the every-node int8 file (sizing a plan cannot profile it), so that is shipped.
    everywhere = bool(args.int8_everywhere or args.max_bytes is not None)
    return ExportConfig(dynamic_axes=axes or None, allow_traced_branches=args.allow_traced_branches, int8=args.int8,
                        int8_everywhere=everywhere, batches=batches, threads=args.threads), batches, axes


def _sequence_export_defaults(export, model, splits, example: Any):
    """What token sequences need to export right: batches cut to their longest sample (``text:FILE``, any data
    set with a ``trim_key``) vary along axis 1, so every input's axis 1 is dynamic (unless --dynamic-axis names
    it); a Hugging Face model's masking code branches on sequence lengths (a shape, not a value), which the
    tracer reports like a data-dependent branch, so transformers models export with those warnings allowed --
    the graph is still verified on real inputs at several batch sizes and lengths."""
    import dataclasses

    from ..data.batches import trim_key_of

    changes: dict[str, Any] = {}
    if trim_key_of(splits.val) is not None and isinstance(example, dict):
        axes = dict(export.dynamic_axes or {})
        for name in example:
            axes.setdefault(name, (1,))
        changes["dynamic_axes"] = axes
    if type(model).__module__.startswith("transformers.") and not export.allow_traced_branches:
        changes["allow_traced_branches"] = True
    return dataclasses.replace(export, **changes) if changes else export


def _held_out(splits, n: int = 64):
    """Real inputs the export is verified on: up to ``n`` rows of the test split (else validation)."""
    from ..data import _dataset_len, first_batch

    source = splits.test if splits.test is not None and _dataset_len(splits.test) else splits.val
    return first_batch(source, min(n, _dataset_len(source)))[0], source


@writes_output_dir
def run(args: argparse.Namespace) -> int:
    from ..files import check_output_dir
    from ..search import compress
    from ..validation import check_int, check_number
    from .finetune import recover_from_args
    from .inputs import default_data_spec, load_data_from_args, load_model

    # Every option and path is checked before any work (loading, training, searching).
    target = _target(args)
    confidence = parse_confidence(args.confidence) if args.confidence is not None else None
    methods = parse_methods(args.methods) if args.methods is not None else None
    include, exclude = layer_patterns(args)
    check_int(args.calibration_samples, "--calibration-samples", minimum=1)
    check_parallel_options(args)
    if args.min_baseline is not None:
        check_number(args.min_baseline, "--min-baseline", minimum=0, maximum=1)
    check_recovery_options(args)
    export, batches, _ = _deploy_options(args)
    check_input_paths(args)
    check_output_dir(args.out, force=args.force)
    check_cache_and_out(args.cache, args.out)
    spec = args.data or default_data_spec(args.model)
    if spec is None:
        raise ConfigError("--data is required for a model that is not built in (e.g. --data data.npz, "
                          "--data mnist:DIR).")
    cache = False if args.no_cache else (args.cache or True)
    splits = load_data_from_args(args, spec)
    model = load_model(args, splits)
    deployment: dict = {}
    original_onnx = None
    file_bytes = None
    if export is not None:
        # A model that does not export, or exports wrong on real inputs, is refused before the search.
        from ..data import first_batch
        from ..deploy.package import export_verified, shipped_bytes
        from ..inputs import to_model

        example = to_model(first_batch(splits.val, 2)[0], model)
        export = _sequence_export_defaults(export, model, splits, example)
        verify_inputs, verify_data = _held_out(splits)
        original_onnx = export_verified(model, example, to_model(verify_inputs, model), export)
        if args.max_bytes is not None:
            def file_bytes(m, example=example, export=export):
                return shipped_bytes(m, example, export, calibration=splits.train)
    latency = not args.ignore_latency
    result = compress(model, splits, metric=args.metric, minimize=args.minimize, methods=methods, fit=args.fit,
                      sensitivity=args.sensitivity, cache=cache, progress=not args.quiet, seed=args.seed,
                      calibration_samples=args.calibration_samples, layers=include, exclude=exclude,
                      fold_bn=args.fold_bn, min_baseline=args.min_baseline, confidence=confidence,
                      latency=latency, batches=batches, latency_threads=args.threads,
                      # What ships with --int8 is model.int8.onnx: the search judges whole plans as int8 files.
                      latency_int8=args.int8 if latency and export is not None else None,
                      rank_multiple=args.rank_multiple, allow_slower=args.allow_slower, file_bytes=file_bytes,
                      workers=args.workers, ray_address=args.ray_address, device=args.device, **target)
    compressed = result.model
    summary = result.summary()
    summary.update({"model": args.model, "weights": args.weights, "data": spec})
    print_report(result)
    args.no_progress = args.quiet
    recovery = recover_from_args(args, model, compressed, splits)  # None without --finetune
    if recovery is not None:
        # The direct problem after the indirect one: fine-tuning keeps the best validation
        # epoch, so the tolerance met by the search still holds.
        compressed = recovery.model
        summary["finetune"] = recovery.to_dict()
        if splits.labelled:
            summary["compressed"].update(accuracy=recovery.val_after, test_accuracy=recovery.test_after)
        else:
            summary["compressed"].update(finetuned_metric=recovery.val_after)
        if splits.labelled:
            print(f"fine-tuned {recovery.epochs_run} epoch(s){' with distillation' if recovery.distilled else ''}: "
                  f"validation accuracy {_pct(recovery.val_before)} -> {_pct(recovery.val_after)}, "
                  f"test accuracy {_pct(recovery.test_before)} -> {_pct(recovery.test_after)}")
        else:  # unlabelled: the validation metric is agreement (logits) or cosine (encoders) with the original
            print(f"fine-tuned {recovery.epochs_run} epoch(s){' with distillation' if recovery.distilled else ''}: "
                  f"validation metric (vs the original) {recovery.val_before:.4f} -> {recovery.val_after:.4f}")
    from ..report_data import enrich_summary

    summary.setdefault("probes", result.probes)
    enrich_summary(summary, original=model, compressed=compressed, plan=result.plan.to_dict()["layers"],
                   splits=splits, argv=args.argv, data_spec=spec, model_spec=args.model, weights=args.weights,
                   seed=args.seed)
    deploy = None
    if export is not None:
        from ..deploy.package import write_deployment
        from ..inputs import to_model

        def deploy(stage, export=export):
            return write_deployment(stage, model, compressed, example, to_model(verify_inputs, compressed), export,
                                    calibration=splits.train, data=verify_data, original_onnx=original_onnx)
    write_outputs(compressed, result.plan, summary, args.out, force=args.force, deploy=deploy)
    if export is not None:
        deployment = {k: summary[k] for k in ("latency_ms", "deployment") if k in summary}
        print_deployment(deployment)
        for advice in ((summary.get("export") or {}).get(k) for k in ("remeasured_advice", "int8_advice")):
            if advice:
                print(f"note: {advice}")
    report = write_run_report(args, args.out)
    files = ["plan.json", "model.safetensors"] + (["model.onnx"] if export is not None else []) + \
        (["model.int8.onnx"] if export is not None and export.int8 else []) + ["summary.json"]
    print(f"wrote {args.out}/{', '.join(files)}" + (", report.html" if report else ""))
    set_result(args, {**summary, "out": str(args.out), "report": report})
    return 0


def print_deployment(deployment: dict, file=None) -> None:
    """The shipped variants on ONNX Runtime: file size, accuracy, latency per batch size."""
    rows = deployment.get("deployment") or []
    if not rows:
        return
    batches = list(rows[0]["latency_ms"])
    original = rows[0]["latency_ms"]
    table = []
    for row in rows:
        cells = [row["name"], format_bytes(row["file_bytes"]),
                 "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.2f}%"]
        fastest, first = row.get("fastest_ms") or {}, rows[0].get("fastest_ms") or {}
        cells += [f"{row['latency_ms'][b]:.4g} ms ({row['latency_ms'][b] / original[b]:.2f}x"
                  + (f", fastest call {fastest[b] / first[b]:.2f}x)" if b in fastest and first.get(b) else ")")
                  for b in batches]
        table.append(cells)
    print("", file=file or sys.stdout)
    print_table(["ONNX Runtime", "file", "accuracy (test)"] + [f"batch {b}" for b in batches], table,
                file=file or sys.stdout)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _interval(pair) -> str:
    """A drop interval in points: '[-0.28, +0.83] points' (the metric's units × 100)."""
    return "-" if not pair else f"[{100 * pair[0]:+.2f}, {100 * pair[1]:+.2f}] points"


def print_report(result, file=None) -> None:
    """The per-layer table and the before/after lines (shared with ``rankshrink demo``)."""
    file = file or sys.stdout
    rows = []
    for layer in result.layers:
        rank = layer["rank"]
        rank = "x".join(str(r) for r in rank) if isinstance(rank, list) else ("" if rank is None else rank)
        rows.append([layer["name"], layer["type"], layer["method"], rank, format_count(layer["params"]),
                     format_count(layer["macs"]), f"{layer['macs'] / max(layer['dense_macs'], 1):.2f}x",
                     f"kept dense: {layer['reason']}" if layer.get("reason") else ""])
    print_table(["layer", "type", "method", "rank", "params", "MACs", "of dense", "note"], rows, file=file)
    from ..search.config import budget_text

    s = result.summary()
    o, c = s["original"], s["compressed"]
    target = (f"tolerance {result.tolerance:g} ({result.metric})" if result.mode == "tolerance"
              else budget_text(result.budget))
    print(f"\n{target}: {result.metric} {result.baseline:.4f} -> {result.value:.4f} (drop {result.drop:+.4f})",
          file=file)
    if any(v is not None for v in (o["accuracy"], c["accuracy"], o["test_accuracy"], c["test_accuracy"])):
        print(f"validation accuracy {_pct(o['accuracy'])} -> {_pct(c['accuracy'])}; "
              f"test accuracy {_pct(o['test_accuracy'])} -> {_pct(c['test_accuracy'])}", file=file)
    ci = s.get("drop_ci") or {}
    if ci.get("validation") or ci.get("test"):
        level = result.confidence or 0.95
        print(f"drop, {level:.0%} paired bootstrap interval: validation {_interval(ci.get('validation'))} "
              f"({result.metric}), test {_interval(ci.get('test'))} (accuracy)"
              + ("; the tolerance applies to the upper end" if result.confidence and result.mode == "tolerance"
                 else ""), file=file)
    print(f"params {format_count(o['params'])} -> {format_count(c['params'])} ({c['params_ratio']:.1%}), "
          f"MACs {format_count(o['macs'])} -> {format_count(c['macs'])} ({c['macs_ratio']:.1%}), "
          f"size {format_bytes(o['bytes'])} -> {format_bytes(c['bytes'])}", file=file)
    print(f"evaluations: {result.evaluations} run, {result.evaluations_cached} from cache; "
          f"{result.seconds:.1f} s", file=file)
    latency = result.latency or {}
    for batch, check in (latency.get("prediction") or {}).items():
        predicted = check.get("predicted_ratio")
        as_int8 = f", both as int8 ({latency['plans_int8']})" if latency.get("plans_int8") else ""
        print(f"latency at batch {batch}{as_int8}: measured {check['measured_ratio']:.2f}x the original"
              + (f" (predicted from layers timed alone: {predicted:.2f}x, error {check['error']:+.0%})"
                 if predicted is not None else ""), file=file)
    for note in result.notes:
        print(f"note: {note}", file=file)
