"""The ``rankshrink`` command line: a thin shell over the Python API.

Each command lives in its own module exposing ``register(subparsers)``, which adds
its sub-parser and sets ``func`` to a function ``(args) -> int``. Only the module of the
command being run is imported (with what it needs, torch included): ``rankshrink --help``
and ``--version`` import neither torch nor any command.

Exit status: 0 success; 1 user error: a :class:`~rankshrink.errors.RankshrinkError`, a bad
option (argparse's usage errors, which argparse itself would end with 2) or a file-system
error (disk full, permission denied), each one line on stderr; 2 internal error (anything
unexpected: a bug; ``--debug``, before or after the command, shows the traceback); 130
interrupted. ``--json`` makes a command print one JSON document on stdout and nothing else
(what it would print goes to stderr); on an error that document is
``{"error": ..., "exit_code": ...}``. Before a command runs,
:func:`check_inputs_not_overwritten` refuses an output path that would replace one of the
command's input files.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
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
    "report": "write report.html for a run directory (compress, apply and finetune write it themselves)",
}
COMMAND_MODULES = tuple(COMMANDS)


def _command_in(argv: list[str]) -> str | None:
    """The command named in ``argv`` (the first word that is one), if any."""
    return next((word for word in argv if word in COMMANDS), None)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is a user error: exit status 1, as every other one."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


_TOP_EPILOG = """exit status: 0 success; 1 user error (the one-line message says what to change); 2 internal error
(a bug: rerun with --debug and report it); 130 interrupted (finished work is kept; rerun to resume).

Every command takes the same --model/--weights/--data/--out/--quiet/--json where they apply; --json prints one
JSON summary on stdout and nothing else. 'rankshrink COMMAND --help' shows each command's options and examples.

examples:
  rankshrink demo
  rankshrink compress --model builtin:digits-cnn --tolerance 1% --out out/
  rankshrink report out/"""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``command``'s module is imported and registered, the others are only listed."""
    from .._version import __version__

    parser = ArgumentParser(
        prog="rankshrink", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_TOP_EPILOG,
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
                "report.json", "report.html")


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
                                       if isinstance(value := getattr(args, name, None), str) and value
                                       and value != "-"]
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


def _fail(args: argparse.Namespace | None, command: str, message: str, code: int) -> int:
    """One line on stderr; with ``--json``, also the error as the one JSON document on stdout."""
    print(f"rankshrink {command}: {message}", file=sys.stderr)
    if args is not None and getattr(args, "json", None) == "-":
        print(json.dumps({"error": message, "exit_code": code, "command": command}))
    return code


def _emit_json(args: argparse.Namespace, code: int) -> None:
    target = getattr(args, "json", None)
    if not isinstance(target, str) or not target:
        return
    payload = getattr(args, "json_result", None)
    if payload is None:
        payload = {"exit_code": code}
    if target == "-":
        print(json.dumps(payload))
        return
    from ..files import atomic_write_json

    atomic_write_json(target, payload)
    print(f"wrote {target}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:  # accepted before or after the command name
        argv = [a for a in argv if a != "--debug"]
    parser = build_parser(_command_in(argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (1)
        return int(exc.code or 0) if isinstance(exc.code, (int, type(None))) else 1
    args.debug = debug
    args.argv = argv  # what the run records as its command line
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    command = " ".join(filter(None, [args.command, getattr(args, "lora_command", None)]))
    to_stdout = getattr(args, "json", None) == "-"
    try:
        _check_common_values(args)
        check_inputs_not_overwritten(args)
        # With --json, stdout carries the one JSON document: everything else printed goes to stderr.
        with contextlib.redirect_stdout(sys.stderr) if to_stdout else contextlib.nullcontext():
            code = int(args.func(args) or 0)
        _emit_json(args, code)
        return code
    except RankshrinkError as exc:
        if debug:
            raise
        return _fail(args, command, f"error: {exc}", 1)
    except KeyboardInterrupt:
        return _fail(args, command, "interrupted; finished work is kept and a rerun resumes it.", 130)
    except OSError as exc:  # disk full, permission denied, ...
        if debug:
            raise
        where = f" ('{exc.filename}')" if getattr(exc, "filename", None) else ""
        return _fail(args, command, f"error: {exc.strerror or exc}{where}; outputs written before are intact. "
                                    "Fix the cause and rerun.", 1)
    except Exception as exc:  # a bug or an unforeseen input: one line, the traceback with --debug
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return _fail(args, command, f"internal error: {type(exc).__name__}: {first} (rerun with --debug for the "
                                    "traceback and please report it).", 2)


if __name__ == "__main__":
    sys.exit(main())
