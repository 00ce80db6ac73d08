"""The ``rankshrink`` command line: a thin shell over the Python API.

Each command lives in its own module exposing ``register(subparsers)``, which adds
its sub-parser and sets ``func`` to a function ``(args) -> int``. Only the module of the
command being run is imported (with what it needs, torch included): ``rankshrink --help``
and ``--version`` import neither torch nor any command. Errors from the
:class:`~rankshrink.errors.RankshrinkError` family become one line on stderr and exit
status 1 (``--debug``, before or after the command, shows the traceback). So do
file-system errors (disk full, permission denied) and, as "internal error", anything
unexpected. Before a command runs, :func:`check_inputs_not_overwritten` refuses an
output path that would replace one of the command's input files.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from ..errors import ConfigError, RankshrinkError

# Command -> one-line help, in the order `rankshrink --help` lists them; each command's module
# (``rankshrink.cli.<command>``) is imported only when that command runs.
COMMANDS = {
    "demo": "train (or load) the digits CNN and compress it within 1 accuracy point",
    "analyze": "per-layer table: shapes, params, MACs, break-even ranks, singular-value energy",
    "compress": "find the smallest ranks within a tolerance, or the best model within a budget",
    "apply": "factorize the layers a plan names and save the compressed model",
    "finetune": "fine-tune a factorized model's factors to recover accuracy (optionally distilling)",
    "lora": "LoRA adapters: train them on a frozen base, merge them in",
    "export": "export to ONNX and measure latency on ONNX Runtime",
}
COMMAND_MODULES = tuple(COMMANDS)


def _command_in(argv: list[str]) -> str | None:
    """The command named in ``argv`` (the first word that is one), if any."""
    return next((word for word in argv if word in COMMANDS), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``command``'s module is imported and registered, the others are only listed."""
    from .._version import __version__

    parser = argparse.ArgumentParser(
        prog="rankshrink",
        description="Shrink trained PyTorch networks with low-rank factorization; adapt them with LoRA.")
    parser.add_argument("--version", action="version", version=f"rankshrink {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary in COMMANDS.items():
        if name == command:
            importlib.import_module(f"{__name__}.{name}").register(subparsers)
        else:
            subparsers.add_parser(name, help=summary, add_help=False)
    return parser


# Argument names that hold input files or directories, and output files or directories.
_INPUT_ARGS = ("weights", "plan", "teacher_weights", "compressed", "adapter")
_OUTPUT_FILE_ARGS = ("json", "drop_slower")
# What commands write into an output directory (and may replace with --force).
OUTPUT_NAMES = ("model.safetensors", "plan.json", "summary.json", "adapter_config.json",
                "adapter_model.safetensors", "train_summary.json", "merge_summary.json", "report.md",
                "report.json")


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_inputs_not_overwritten(args: argparse.Namespace) -> None:
    """Refuse outputs that would replace an input file (the user's model is only ever read)."""
    inputs = [(name, Path(value)) for name in _INPUT_ARGS
              if isinstance(value := getattr(args, name, None), str) and value]
    if not inputs:
        return
    outputs: list[tuple[str, Path]] = [(name, Path(value)) for name in _OUTPUT_FILE_ARGS
                                       if isinstance(value := getattr(args, name, None), str) and value]
    out = getattr(args, "out", None)
    if isinstance(out, str) and out:
        out_path = Path(out)
        if out_path.suffix and not out_path.is_dir():  # a file output such as export's model.onnx
            outputs.append(("out", out_path))
        else:
            outputs.extend(("out", out_path / name) for name in OUTPUT_NAMES)
            for arg, path in inputs:
                if path.is_dir() and _same(path, out_path):
                    raise ConfigError(f"--out '{out}' is the --{arg.replace('_', '-')} directory; rankshrink never "
                                      "writes over its inputs. Choose another --out.")
    for arg, path in inputs:
        candidates = [path] + ([path / name for name in OUTPUT_NAMES] if path.is_dir() else [])
        for out_arg, target in outputs:
            if any(_same(candidate, target) for candidate in candidates):
                raise ConfigError(f"--{out_arg.replace('_', '-')} would overwrite the input file '{target}' "
                                  f"(given as --{arg.replace('_', '-')}); rankshrink never writes over its inputs. "
                                  "Choose another output path.")


def _check_common_values(args: argparse.Namespace) -> None:
    seed = getattr(args, "seed", None)
    if isinstance(seed, int) and not 0 <= seed < 2**32:
        raise ConfigError(f"--seed must be an integer from 0 to {2**32 - 1}, got {seed}.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:  # accepted before or after the command name
        argv = [a for a in argv if a != "--debug"]
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    args.debug = debug
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    command = " ".join(filter(None, [args.command, getattr(args, "lora_command", None)]))
    try:
        _check_common_values(args)
        check_inputs_not_overwritten(args)
        return int(args.func(args) or 0)
    except RankshrinkError as exc:
        if debug:
            raise
        print(f"rankshrink {command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"rankshrink {command}: interrupted; finished work is kept and a rerun resumes it.",
              file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, permission denied, ...
        if debug:
            raise
        where = f" ('{exc.filename}')" if getattr(exc, "filename", None) else ""
        print(f"rankshrink {command}: error: {exc.strerror or exc}{where}; outputs written before are intact. "
              "Fix the cause and rerun.", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug or an unforeseen input: one line, the traceback with --debug
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"rankshrink {command}: internal error: {type(exc).__name__}: {first} (rerun with --debug for "
              "the traceback and please report it).", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
