"""The ``rankshrink lora`` commands: plain functions plus their argparse registration.

``train_adapter_command`` and ``merge_adapter_command`` take already-parsed values
and return a summary dict (also written as JSON); :func:`add_lora_subparser`
registers ``rankshrink lora train`` and ``rankshrink lora merge`` on the main
parser's sub-parsers, each setting ``func(args) -> int`` like the other commands.

``--weights`` may be a state-dict file (the base as built by ``--model``) or a
directory written by ``rankshrink apply``/``compress`` (model.safetensors + plan.json),
so a compressed model can be adapted and merged the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ..errors import ConfigError
from ..files import atomic_write_json, check_output_dir, output_set, save_tensors
from ..lora.config import LoraConfig
from ..lora.io import CONFIG_NAME, WEIGHTS_NAME, adapter_size_bytes, load_adapter, save_adapter
from ..lora.model import add_adapters, count_parameters, lora_layers, remove_adapters
from .common import HelpFormatter, add_output_options, check_input_paths, epilog, set_result, writes_output_dir

TRAIN_SUMMARY = "train_summary.json"
MERGED_WEIGHTS = "model.safetensors"
MERGE_SUMMARY = "merge_summary.json"
_TRAIN_OWN_FILES = (CONFIG_NAME, WEIGHTS_NAME, TRAIN_SUMMARY, "train_checkpoint.pt")


def load_base_model(model_spec: str, weights: str | None = None, *, trust_pickle: bool = False):
    """(model, plan or None): a dense model from SPEC/weights, or a compressed one from a directory."""
    from ..models import load_model_spec

    if weights is not None and Path(weights).is_dir():
        from ..plan import Plan
        from ..surgery import PLAN_FILE, load

        plan = Plan.load(Path(weights) / PLAN_FILE) if (Path(weights) / PLAN_FILE).exists() else None
        return load(_architecture(model_spec, trust_pickle), weights), plan
    return load_model_spec(model_spec, weights, trust_pickle=trust_pickle), None


def _architecture(model_spec: str, trust_pickle: bool) -> nn.Module:
    """The (untrained) model a SPEC builds, for loading a compressed model's weights into."""
    from ..models import BUILTIN_MODELS, load_model_spec

    name = model_spec.strip()[len("builtin:"):] if model_spec.strip().startswith("builtin:") else None
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name].create()  # no need to train/load the built-in's own weights
    return load_model_spec(model_spec, trust_pickle=trust_pickle)


def parse_targets(values: Sequence[str] | str | None) -> list[str] | str:
    """``--target fc1 fc2`` / ``--target fc1,fc2`` / ``--target Linear`` -> target_modules."""
    if values is None:
        return "all"
    if isinstance(values, str):
        values = [values]
    items = [part.strip() for value in values for part in value.split(",") if part.strip()]
    if not items:
        raise ConfigError("--target is empty; name layers (fc1,fc2), a type (Linear, Conv2d) or 'all'.")
    return items[0] if len(items) == 1 else items


def train_adapter_command(*, model: str, weights: str | None, data: str | None, target: Sequence[str] | str | None,
                          rank: int = 4, alpha: float = 8.0, dropout: float = 0.0, rslora: bool = False,
                          init: str = "kaiming", epochs: int = 10, lr: float = 5e-3, batch_size: int = 64,
                          patience: int | None = None, seed: int = 0, out: str, force: bool = False,
                          trust_pickle: bool = False, progress: bool = True) -> dict[str, Any]:
    """Add a LoRA adapter to the model, train it on ``data``, save it to ``out``.

    ``out`` gets ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT layout) and
    ``train_summary.json``. A rerun with the same arguments resumes from the checkpoint
    left in ``out`` by an interrupted run.
    """
    from ..data import load_data
    from ..lora.training import train_adapter
    from ..metrics import accuracy
    from ..validation import check_int, check_number, check_optional_int

    check_int(epochs, "--epochs", minimum=0)  # every option before any work
    check_number(lr, "--lr", minimum=0, low_open=True)
    check_int(batch_size, "--batch-size", minimum=1)
    check_optional_int(patience, "--patience", minimum=1)
    check_int(seed, "--seed", minimum=0)
    out_dir = Path(out)
    resuming = (out_dir / "train_checkpoint.pt").exists()
    if not resuming:
        check_output_dir(out_dir, force=force)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=parse_targets(target), lora_dropout=dropout,
                        use_rslora=rslora, init_lora_weights=True if init == "kaiming" else init)
    base, _ = load_base_model(model, weights, trust_pickle=trust_pickle)
    splits = load_data(data)
    adapted = add_adapters(base, config, seed=seed)
    counts = count_parameters(adapted)
    base_test = accuracy(base, splits.test)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = train_adapter(adapted, splits.train, val_data=splits.val, epochs=epochs, lr=lr,
                           batch_size=batch_size, patience=patience, seed=seed, checkpoint_dir=out_dir,
                           progress=progress)
    save_adapter(adapted, out_dir, base_model_name_or_path=model)
    summary = {
        "model": model, "weights": weights, "data": data or "builtin:digits",
        "targets": sorted(lora_layers(adapted)), "rank": rank, "alpha": alpha, "dropout": dropout,
        "use_rslora": rslora, "init": init,
        "trainable_parameters": counts.trainable, "total_parameters": counts.total,
        "trainable_percent": counts.trainable_percent,
        "base_test_accuracy": base_test, "adapted_test_accuracy": accuracy(adapted, splits.test),
        "best_val_accuracy": result.best_val, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early, "adapter_bytes": adapter_size_bytes(out_dir),
        "history": result.history,
    }
    atomic_write_json(out_dir / TRAIN_SUMMARY, summary)
    checkpoint = out_dir / "train_checkpoint.pt"
    if checkpoint.exists():  # finished: the adapter files are the result, the checkpoint is not needed
        checkpoint.unlink()
    return summary


def merge_adapter_command(*, model: str, weights: str | None, adapter: str, out: str, force: bool = False,
                          trust_pickle: bool = False, check_fingerprint: bool = True) -> dict[str, Any]:
    """Load the base, apply the adapter in ``adapter``, fold it in (``W + s·B·A``), save to ``out``.

    ``out`` gets ``model.safetensors`` - a plain state dict of the base architecture
    (load it with ``--weights``) - or, for a compressed base, the same files as
    ``rankshrink apply`` writes (svd/weight blocks grow by the adapter's rank).
    """
    check_output_dir(out, force=force)
    base, plan = load_base_model(model, weights, trust_pickle=trust_pickle)
    adapted = load_adapter(base, adapter, check_fingerprint=check_fingerprint)
    layers = sorted(lora_layers(adapted))
    merged = remove_adapters(adapted, merge=True, inplace=True)
    from ..models import check_finite

    check_finite(merged, f"the model merged with adapter '{adapter}'",
                 fix="The adapter's update overflows the layer; retrain the adapter (lower --lr).")
    out_dir = Path(out)
    summary = {"model": model, "weights": weights, "adapter": str(adapter), "merged_layers": layers,
               "parameters": sum(p.numel() for p in merged.parameters()), "out": str(out_dir)}
    # One verifiable set: staged, then renamed in with the summary (and checksums) last.
    with output_set(out_dir, force=force, summary=summary, summary_name=MERGE_SUMMARY) as stage:
        if plan is not None:
            from ..surgery import save

            new_plan = plan
            for name in plan:
                module = merged.get_submodule(name)
                if getattr(module, "rank", None) != plan[name].rank:
                    new_plan = new_plan.with_layer(name, plan[name].method, module.rank)
            save(merged, new_plan, stage, force=True)
        else:
            save_tensors(stage / MERGED_WEIGHTS, merged.state_dict(), metadata={"format": "pt"})
    return summary


# ---------------------------------------------------------------------------- argparse
def add_lora_subparser(subparsers) -> argparse.ArgumentParser:
    """Register ``lora train`` and ``lora merge`` on the main parser's sub-parsers."""
    train_example = ("rankshrink lora train --model builtin:digits-cnn --target classifier.1,classifier.3 --rank 4 "
                     "--alpha 8 --out adapter/")
    merge_example = "rankshrink lora merge --model builtin:digits-cnn --adapter adapter/ --out merged/"
    parser = subparsers.add_parser(
        "lora", help="train LoRA adapters and merge them into a model",
        description="Low-rank adapters (LoRA): train only small A·B updates of chosen layers, save them in "
                    "Hugging Face PEFT's file layout, merge them into the weights.",
        epilog=epilog(train_example, merge_example), formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="lora_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 1)[1])

    def model_args(p):
        p.add_argument("--model", required=True,
                       help="builtin:digits-cnn | builtin:cifar-cnn | builtin:mnist-mlp | path/to/file.py:factory")
        p.add_argument("--weights", help="base weights: .safetensors/.pt state dict, or a directory written by "
                                         "'rankshrink apply'/'compress' (a compressed model)")
        p.add_argument("--trust-pickle", action="store_true",
                       help="allow .pt files that need full pickle (runs code from the file: only for files you trust)")

    train = commands.add_parser(
        "train", help="add adapters to a model and train them (base weights stay frozen)",
        formatter_class=HelpFormatter,
        epilog=epilog(train_example, "rankshrink lora train --model my_model.py:make --weights w.safetensors "
                                     "--data mnist:~/mnist --target Linear --rank 8 --epochs 3 --out adapter/ --json"),
        description="Add a LoRA adapter to the --target layers, train only the adapter on --data, and write "
                    "adapter_config.json + adapter_model.safetensors (PEFT layout) and train_summary.json to "
                    "--out. An interrupted run resumes when rerun with the same arguments.")
    model_args(train)
    train.add_argument("--data", help="data SPEC (default: builtin:digits)")
    train.add_argument("--target", nargs="+", metavar="LAYER",
                       help="layers to adapt: names (fc1 fc2 or fc1,fc2), a type (Linear, Conv1d, Conv2d, "
                            "Factorized), 'all' (default), or a regex matching whole layer names")
    train.add_argument("--rank", type=int, default=4, help="adapter rank r (default 4)")
    train.add_argument("--alpha", type=float, default=8.0, help="scale numerator: update = alpha/r · B·A (default 8)")
    train.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapter input (default 0)")
    train.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha/√r")
    train.add_argument("--init", choices=("kaiming", "gaussian", "pissa"), default="kaiming",
                       help="A's initialisation (B starts at 0), or pissa: start from the top-r SVD part of W")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--lr", type=float, default=5e-3)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--patience", type=int, help="stop after this many epochs without validation improvement")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", required=True, help="adapter output directory")
    train.add_argument("--force", action="store_true", help="allow a non-empty --out (replaces our files only)")
    add_output_options(train)  # --quiet (alias --no-progress), --json
    train.set_defaults(func=_run_train)

    merge = commands.add_parser(
        "merge", help="fold an adapter into the base weights and save a plain model",
        formatter_class=HelpFormatter,
        epilog=epilog(merge_example, "rankshrink lora merge --model builtin:digits-cnn --weights out/ --adapter "
                                     "adapter/ --out merged/ --json"),
        description="Load the base model and the adapter in --adapter, merge W + s·B·A, and write the merged "
                    "weights to --out (model.safetensors; for a compressed base also plan.json).")
    model_args(merge)
    merge.add_argument("--adapter", required=True, help="adapter directory (from 'rankshrink lora train' or PEFT)")
    merge.add_argument("--out", required=True, help="output directory")
    merge.add_argument("--force", action="store_true", help="allow a non-empty --out (replaces our files only)")
    merge.add_argument("--no-check-fingerprint", action="store_true",
                       help="load the adapter even if the base weights differ from the ones it was trained on")
    add_output_options(merge, progress=False)
    merge.set_defaults(func=_run_merge)
    return parser


@writes_output_dir
def _run_train(args: argparse.Namespace) -> int:
    check_input_paths(args, weights_may_be_dir=True)
    summary = train_adapter_command(
        model=args.model, weights=args.weights, data=args.data, target=args.target, rank=args.rank,
        alpha=args.alpha, dropout=args.dropout, rslora=args.rslora, init=args.init, epochs=args.epochs,
        lr=args.lr, batch_size=args.batch_size, patience=args.patience, seed=args.seed, out=args.out,
        force=args.force, trust_pickle=args.trust_pickle, progress=not args.quiet)
    print(f"adapted layers: {', '.join(summary['targets'])}")
    print(f"trainable params: {summary['trainable_parameters']:,} of {summary['total_parameters']:,} "
          f"({summary['trainable_percent']:.2f}%)")
    print(f"test accuracy: base {summary['base_test_accuracy']:.4f} -> adapted {summary['adapted_test_accuracy']:.4f}")
    print(f"wrote {args.out}/{CONFIG_NAME}, {WEIGHTS_NAME} ({summary['adapter_bytes']:,} bytes), {TRAIN_SUMMARY}")
    set_result(args, summary)
    return 0


@writes_output_dir
def _run_merge(args: argparse.Namespace) -> int:
    check_input_paths(args, weights_may_be_dir=True)
    summary = merge_adapter_command(model=args.model, weights=args.weights, adapter=args.adapter, out=args.out,
                                    force=args.force, trust_pickle=args.trust_pickle,
                                    check_fingerprint=not args.no_check_fingerprint)
    print(f"merged adapter into: {', '.join(summary['merged_layers'])}")
    print(f"wrote {args.out}/ ({summary['parameters']:,} parameters)")
    set_result(args, summary)
    return 0


# The lead's CLI loads command modules exposing ``register(subparsers)``.
register = add_lora_subparser
