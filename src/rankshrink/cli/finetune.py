"""``rankshrink finetune``: recover a factorized model's accuracy by training its factors.

Three ways to say what to fine-tune:

* ``--weights ORIGINAL.pt --plan plan.json``: the original weights; the plan is applied
  first (exactly as :func:`rankshrink.apply` does: entries fitted to activations are
  calibrated on the training split as the plan records; ``--fit`` re-fits them all),
  then fine-tuned.
* ``--weights DIR``: a directory written by ``rankshrink apply``/``compress``/``finetune``
  (``model.safetensors`` + ``plan.json``); ``--plan`` is optional and must match.
* ``--weights DIR/model.safetensors --plan DIR/plan.json``: the same, as files.

``--distill`` adds knowledge distillation from the original model (the ``--weights``
original, or ``--teacher-weights``, or the built-in's own trained weights). The output
directory gets ``model.safetensors``, ``plan.json`` and ``summary.json`` (accuracy before
and after on validation and test); a non-empty ``--out`` is refused without ``--force``.
Training checkpoints after every epoch in ``--out/.finetune-checkpoint/``: rerun the same
command after an interruption to resume (``--force`` starts over instead).

:func:`add_recovery_arguments` and :func:`recover_from_args` give ``rankshrink compress``
its ``--finetune EPOCHS [--distill]`` options with the same behaviour.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from .common import (
    add_command,
    add_model_arguments,
    add_output_options,
    add_report_option,
    check_input_paths,
    check_training_options,
    print_table,
    set_result,
    write_run_report,
    writes_output_dir,
)

CHECKPOINT_DIR = ".finetune-checkpoint"
SUMMARY_FILE = "summary.json"


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "finetune",
        help="fine-tune a factorized model's factors to recover accuracy (optionally distilling)",
        description="Recovery fine-tuning: train the factor layers of a factorized model (or everything) on the "
                    "training split, keep the best validation epoch, and save the result (model.safetensors, "
                    "plan.json, summary.json, report.html). Accuracy never gets worse on validation than the model "
                    "it starts from.",
        examples=["rankshrink finetune --model builtin:digits-cnn --weights out/ --epochs 3 --distill --out tuned/",
                  "rankshrink finetune --model my_model.py:make --weights w.safetensors --plan plan.json "
                  "--data mnist:~/mnist --epochs 5 --out tuned/",
                  "rankshrink finetune --model builtin:digits-cnn --weights out/ --epochs 2 --out tuned/ --json"])
    add_model_arguments(parser)
    parser.add_argument("--plan", help="plan JSON; required unless --weights is a directory written by rankshrink")
    from .inputs import add_data_arguments

    add_data_arguments(parser)
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--force", action="store_true",
                        help="allow a non-empty --out (replaces our files only; discards a checkpoint)")
    _add_training_arguments(parser, prefix="")
    parser.add_argument("--teacher-weights", help="original (uncompressed) weights for --distill when --weights "
                                                  "holds a compressed model")
    parser.add_argument("--fit", "--objective", dest="fit", choices=("activations", "weights"),
                        help="when --weights holds the original model: re-fit every plan entry to the activations "
                             "or the weights (default: as the plan says)")
    add_output_options(parser)  # --quiet (alias --no-progress), --json
    add_report_option(parser)
    parser.set_defaults(func=run)


def _add_training_arguments(parser: argparse.ArgumentParser, prefix: str) -> None:
    from ..finetuning import DEFAULT_LR, ENCODER_LR, TRAIN_CHOICES

    dest = prefix.replace("-", "_")
    parser.add_argument("--distill", action="store_true",
                        help="distil from the original model (KL on temperature-softened logits; for an encoder's "
                             "hidden states on unlabelled data: 1 - cosine of the mean-pooled outputs)")
    parser.add_argument(f"--{prefix}lr", dest=f"{dest}lr", type=float, default=None,
                        help=f"learning rate (default {DEFAULT_LR:g}; {ENCODER_LR:g} when distilling an encoder's "
                             "hidden states)")
    parser.add_argument(f"--{prefix}batch-size", dest=f"{dest}batch_size", type=int, default=64,
                        help="batch size (default 64)")
    parser.add_argument(f"--{prefix}train", dest=f"{dest}train", choices=TRAIN_CHOICES, default="factors",
                        help="what to train: the factor layers (default) or all parameters")
    parser.add_argument(f"--{prefix}patience", dest=f"{dest}patience", type=int,
                        help="stop after this many epochs without validation improvement")
    parser.add_argument(f"--{prefix}schedule", dest=f"{dest}schedule", choices=("cosine", "constant"),
                        default="cosine", help="learning-rate schedule (default cosine)")
    from ..train import DISTILL_LOSSES

    parser.add_argument("--distill-loss", choices=DISTILL_LOSSES, default="auto",
                        help="with --distill: kl (logits), cosine or mse (outputs), tokens (an encoder's pooled "
                             "cosine plus every real token's hidden state); default auto (kl for classifiers, "
                             "cosine for encoders)")
    parser.add_argument("--distill-temperature", type=float, default=2.0, help="distillation temperature (default 2)")
    parser.add_argument("--distill-weight", type=float, default=0.5,
                        help="weight of the distillation term against cross-entropy (default 0.5)")
    if not prefix:
        parser.add_argument("--seed", type=int, default=0, help="seed for shuffling and dropout (default 0)")


def add_recovery_arguments(parser: argparse.ArgumentParser) -> None:
    """``--finetune EPOCHS [--distill] [--finetune-lr ...]`` for another command (e.g. ``compress``)."""
    parser.add_argument("--finetune", type=int, default=0, metavar="EPOCHS",
                        help="after compressing, fine-tune the factors for EPOCHS epochs (default 0: no)")
    _add_training_arguments(parser, prefix="finetune-")


def recover_from_args(args: argparse.Namespace, original, compressed, splits, *, checkpoint_dir=None):
    """Run :func:`rankshrink.finetune.finetune` as ``add_recovery_arguments`` asked; None when ``--finetune 0``."""
    from ..errors import ConfigError
    from ..finetuning import finetune

    epochs = getattr(args, "finetune", 0) or 0
    if epochs < 0:
        raise ConfigError(f"--finetune must be a non-negative number of epochs, got {epochs}.")
    if epochs == 0:
        if getattr(args, "distill", False):
            raise ConfigError("--distill only applies with --finetune EPOCHS (EPOCHS > 0).")
        return None
    if getattr(args, "device", None) is not None:  # where compress ran: the teacher and the student together
        from ..devices import on_device

        original, compressed = on_device(original, args.device), on_device(compressed, args.device)
    return finetune(compressed, splits, epochs, teacher=original if args.distill else None,
                    train=args.finetune_train, lr=args.finetune_lr, batch_size=args.finetune_batch_size,
                    schedule=args.finetune_schedule, patience=args.finetune_patience,
                    distill_temperature=args.distill_temperature, distill_weight=args.distill_weight,
                    distill_loss=args.distill_loss,
                    seed=getattr(args, "seed", 0) or 0, checkpoint_dir=checkpoint_dir,
                    progress=not (getattr(args, "quiet", False) or getattr(args, "no_progress", False)))


# --------------------------------------------------------------------------- finetune command

def _fresh_model(spec: str, splits=None):
    """An instance of the model SPEC's architecture (a built-in sized for ``splits``) without loading weights."""
    from ..models import BUILTIN_MODELS, load_model_spec

    if spec.startswith("builtin:") and spec[len("builtin:"):] in BUILTIN_MODELS:
        entry = BUILTIN_MODELS[spec[len("builtin:"):]]
        if splits is not None and isinstance(splits.input_shape, tuple):
            return entry.create(splits.input_shape, splits.num_classes).eval()
        return entry.create().eval()
    return load_model_spec(spec)


def _check_out(out: str, force: bool) -> bool:
    """Validate --out before any work; True when an interrupted run's checkpoint will be resumed."""
    from ..errors import ConfigError

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output path '{path}' exists and is not a directory; choose another --out.")
    if not path.is_dir():
        return False
    entries = {p.name for p in path.iterdir()}
    if not entries:
        return False
    if force:
        return False
    if entries == {CHECKPOINT_DIR}:
        return True
    raise ConfigError(f"output directory '{path}' is not empty; pass --force to replace rankshrink's own files "
                      "in it, or choose another --out.")


def _load_compressed(args, plan, splits=None):
    """(compressed model, plan, original or None) from --weights/--plan, as the module notes describe."""
    from ..errors import ConfigError, FileFormatError
    from ..files import load_state_dict
    from ..models import load_model_spec
    from ..plan import Plan
    from ..surgery import PLAN_FILE, WEIGHTS_FILE, empty_skeleton, load, load_state_dict_checked

    weights = args.weights
    if weights is not None and Path(weights).is_dir():
        directory = Path(weights)
        if not (directory / PLAN_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise FileFormatError(f"'{directory}' is not a directory written by rankshrink (it needs {PLAN_FILE} and "
                                  f"{WEIGHTS_FILE}).")
        saved = Plan.load(directory / PLAN_FILE)
        if plan is not None and plan.key() != saved.key():
            raise ConfigError(f"--plan does not match '{directory / PLAN_FILE}'; drop --plan to use the saved one.")
        return load(_fresh_model(args.model, splits), directory), saved, None
    if plan is None:
        raise ConfigError("--plan is required unless --weights is a directory written by rankshrink "
                          "(model.safetensors + plan.json).")
    if weights is None:
        return None, plan, load_model_spec(args.model, trust_pickle=args.trust_pickle, data=splits)
    try:
        original = load_model_spec(args.model, weights, trust_pickle=args.trust_pickle, data=splits)
        return None, plan, original
    except FileFormatError as as_original:
        state = load_state_dict(weights, trust_pickle=args.trust_pickle)
        skeleton = empty_skeleton(_fresh_model(args.model, splits), plan, inplace=True)
        try:
            load_state_dict_checked(skeleton, state, weights)
        except FileFormatError as as_compressed:
            raise FileFormatError(f"'{weights}' fits neither the original model ({as_original}) nor the model "
                                  f"factorized by the plan ({as_compressed}).") from None
        return skeleton.eval(), plan, None


@writes_output_dir
def run(args: argparse.Namespace) -> int:
    from ..data import has_labels
    from ..errors import ConfigError
    from ..files import output_set
    from ..finetuning import finetune
    from ..metrics import accuracy
    from ..models import load_model_spec
    from ..plan import Plan
    from ..surgery import apply, save
    from .inputs import default_data_spec, load_data_from_args

    if args.epochs < 0:
        raise ConfigError(f"--epochs must be a non-negative integer, got {args.epochs}.")
    check_training_options(args, epochs="--epochs")  # every option and path before any work
    check_input_paths(args, weights_may_be_dir=True)
    plan = Plan.load(args.plan) if args.plan else None
    resume = _check_out(args.out, args.force)
    spec = args.data or default_data_spec(args.model)
    if spec is None:
        raise ConfigError("fine-tuning needs data: pass --data SPEC (builtin:digits, mnist:DIR, cifar10:DIR, "
                          "synthetic:cifar).")
    splits = load_data_from_args(args, spec)
    progress = not args.quiet
    compressed, plan, original = _load_compressed(args, plan, splits)
    fit = "loaded"
    if compressed is None:
        if args.fit is not None:
            plan = plan.with_fit(args.fit)
        compressed = apply(original, plan, data=splits, progress=progress)  # the same model apply builds
        fit = args.fit or "as planned"
    teacher = None
    if args.distill:
        teacher = original if original is not None else load_model_spec(args.model, args.teacher_weights,
                                                                           trust_pickle=args.trust_pickle, data=splits)
    out = Path(args.out)
    checkpoint = out / CHECKPOINT_DIR
    if checkpoint.is_symlink() or (os.path.lexists(checkpoint) and not checkpoint.is_dir()):
        checkpoint.unlink()  # a link or file under our name inside --out: never followed, never written through
        resume = False
    if args.force and checkpoint.is_dir():
        shutil.rmtree(checkpoint)
    if resume:
        print(f"resuming from the checkpoint in {checkpoint}")
    result = finetune(compressed, splits, args.epochs, teacher=teacher, train=args.train, lr=args.lr,
                      batch_size=args.batch_size, schedule=args.schedule, patience=args.patience,
                      distill_temperature=args.distill_temperature, distill_weight=args.distill_weight,
                      distill_loss=args.distill_loss,
                      seed=args.seed, checkpoint_dir=checkpoint, progress=progress, inplace=True)
    reference = original if original is not None else teacher
    accuracies: dict[str, dict[str, float | None]] = {}
    if reference is not None and splits.labelled:
        accuracies["original"] = {"val": accuracy(reference, splits.val),
                                  "test": accuracy(reference, splits.test) if has_labels(splits.test) else None}
    accuracies["factorized"] = {"val": result.val_before, "test": result.test_before}
    accuracies["finetuned"] = {"val": result.val_after, "test": result.test_after}
    summary = {"command": "finetune", "model": args.model, "data": spec, "fit": fit,
               "seed": args.seed, "plan": plan.to_dict(), "accuracy": accuracies, "finetune": result.to_dict()}
    _add_report_data(summary, args, reference, result.model, plan, splits)
    # --out was validated before training; it now holds only the checkpoint besides the user's files.
    with output_set(out, force=True, summary=summary, summary_name=SUMMARY_FILE) as stage:
        save(result.model, plan, stage, force=True)
    shutil.rmtree(checkpoint, ignore_errors=True)
    report = write_run_report(args, out)
    set_result(args, {**summary, "out": str(out), "report": report})

    def pct(value):
        return "" if value is None else f"{100 * value:.2f}%"

    rows = [[stage, pct(acc["val"]), pct(acc["test"])] for stage, acc in accuracies.items()]
    print_table(["model", "val accuracy", "test accuracy"], rows)
    print(f"\ntrained {result.trained} ({result.trained_parameters:,} of {result.total_parameters:,} parameters) for "
          f"{result.epochs_run} epochs{' with distillation' if result.distilled else ''}; best epoch "
          f"{result.best_epoch}{' (the starting model was best)' if result.best_epoch == 0 else ''}")
    print(f"wrote {out}/model.safetensors, plan.json, {SUMMARY_FILE}" + (", report.html" if report else ""))
    return 0


def _add_report_data(summary: dict, args: argparse.Namespace, reference, tuned, plan, splits) -> None:
    """Sizes of the original (when known) and the fine-tuned model, and what the report draws from."""
    from ..cost import count
    from ..data import first_batch
    from ..inputs import to_model
    from ..report_data import enrich_summary

    example = to_model(first_batch(splits.val)[0], tuned)
    if reference is not None:
        summary["original"] = count(reference, example).to_dict()
    summary["compressed"] = count(tuned, example).to_dict()
    enrich_summary(summary, original=reference, compressed=tuned, plan=plan.to_dict()["layers"],
                   example_input=example, splits=splits, argv=args.argv, data_spec=summary["data"],
                   model_spec=args.model, weights=args.weights, seed=args.seed)
