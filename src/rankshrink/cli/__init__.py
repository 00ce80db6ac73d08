"""The ``rankshrink`` command line: a thin shell over the Python API.

Each command lives in its own module exposing ``register(subparsers)``, which adds
its sub-parser and sets ``func`` to a function ``(args) -> int``. Errors from the
:class:`~rankshrink.errors.RankshrinkError` family become one line on stderr and exit
status 1 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import RankshrinkError

# Command modules, in the order `rankshrink --help` lists them.
COMMAND_MODULES = ("demo", "analyze", "compress", "apply", "finetune", "lora", "export")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="rankshrink",
        description="Shrink trained PyTorch networks with low-rank factorization; adapt them with LoRA.")
    parser.add_argument("--version", action="version", version=f"rankshrink {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # command not part of this build
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except RankshrinkError as exc:
        if args.debug:
            raise
        print(f"rankshrink {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"rankshrink {args.command}: interrupted; finished work is kept and a rerun resumes it.",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
