"""Argument helpers and table printing shared by the command modules."""

from __future__ import annotations

import argparse
import functools
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ConfigError

_BYTE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
               "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_ratio(text: str, what: str = "ratio") -> float:
    """'0.5' or '50%' -> 0.5; must lie in (0, 1]."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ConfigError(f"{what} must be a number like 0.5 or 50%, got {text!r}.") from None
    if not 0 < value <= 1:
        raise ConfigError(f"{what} must be in (0, 1] (or 0%..100%), got {text!r}.")
    return value


def parse_bytes(text: str, what: str = "size") -> int:
    """'256KB', '1.5MB', '4096', '2MiB' -> bytes (KB = 1000, KiB = 1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _BYTE_UNITS:
        raise ConfigError(f"{what} must be a size like 4096, 256KB, 1.5MB or 2MiB, got {text!r}.")
    value = int(float(match.group(1)) * _BYTE_UNITS[unit])
    if value <= 0:
        raise ConfigError(f"{what} must be positive, got {text!r}.")
    return value


def add_model_arguments(parser: argparse.ArgumentParser, *, model_default: str | None = None) -> None:
    parser.add_argument("--model", default=model_default, required=model_default is None,
                        help="builtin:digits-cnn | builtin:cifar-cnn | builtin:mnist-mlp | path/to/file.py:factory | "
                             "model.onnx | hf:DIR (a local Hugging Face model directory, loaded offline)")
    parser.add_argument("--weights", help="state dict as .safetensors or .pt (loaded with weights_only=True)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow .pt files that need full pickle (runs code from the file: only for files you "
                             "trust)")


def add_layer_arguments(parser: argparse.ArgumentParser) -> None:
    """``--layers`` / ``--exclude``: glob patterns over qualified layer names (comma-separated or repeated)."""
    parser.add_argument("--layers", action="append", metavar="PATTERNS",
                        help="only these layers: glob patterns over qualified names, comma-separated or repeated "
                             "(features.*,classifier.1)")
    parser.add_argument("--exclude", action="append", metavar="PATTERNS",
                        help="leave these layers alone: glob patterns over qualified names (e.g. '*.downsample.*')")


def layer_patterns(args: argparse.Namespace) -> tuple[list[str] | None, list[str] | None]:
    """(include, exclude) pattern lists from ``--layers`` / ``--exclude`` (None when not given)."""
    def split(values):
        if not values:
            return None
        patterns = [part.strip() for value in values for part in value.split(",") if part.strip()]
        if not patterns:
            raise ConfigError("--layers/--exclude need at least one pattern, like features.* or classifier.1.")
        return patterns

    return split(getattr(args, "layers", None)), split(getattr(args, "exclude", None))


def format_count(value: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{int(value)} B"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], file=None) -> None:
    """A plain aligned text table (numbers right-aligned)."""
    file = file or sys.stdout
    cells = [[str(c) for c in headers]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(r[i]) for r in cells[1:] if r[i]) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()

    print(line(cells[0]), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells[1:]:
        print(line(row), file=file)


def _is_number(text: str) -> bool:
    return bool(re.fullmatch(r"-?[0-9.,]+[kMG%x]?", text))


# --------------------------------------------------------------------------- one workflow: shared options, help

EXIT_CODES = ("exit status: 0 success; 1 user error (a bad option, input file or data: the one-line message says "
              "what to change); 2 internal error (a bug: rerun with --debug and report it); 130 interrupted "
              "(finished work is kept, and rerunning the same command resumes it)")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, but an epilog of examples keeps its lines (descriptions still wrap)."""

    def _fill_text(self, text, width, indent):
        if text.startswith(("exit status:", "examples:")):
            import textwrap

            head, _, examples = text.partition("\n\nexamples:\n")
            wrapped = textwrap.fill(head, width, initial_indent=indent, subsequent_indent=indent + "  ")
            return wrapped + ("\n\nexamples:\n" + examples if examples else "")
        return super()._fill_text(text, width, indent)


def epilog(*examples: str) -> str:
    """The end of every command's --help: the exit codes, then two or three examples."""
    return EXIT_CODES + "\n\nexamples:\n" + "\n".join(f"  {example}" for example in examples)


def add_command(subparsers, name: str, *, help: str, description: str, examples: Sequence[str]):
    """A command's sub-parser whose --help ends with the exit codes and ``examples``."""
    return subparsers.add_parser(name, help=help, description=description, epilog=epilog(*examples),
                                 formatter_class=HelpFormatter)


def add_output_options(parser: argparse.ArgumentParser, *, progress: bool = True) -> None:
    """``--quiet`` (``--no-progress`` is an alias) and ``--json [FILE]``, the same on every command.

    ``progress`` False: the command shows no progress bars, and ``--quiet`` is accepted so that
    one set of options works everywhere.
    """
    parser.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                        help="no progress bars (--no-progress is the same)" if progress
                        else "accepted for uniformity: this command shows no progress bars")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="print one JSON summary on stdout and nothing else (tables and notes go to stderr); "
                             "with FILE, write the JSON to FILE instead and print the tables as usual")


def add_report_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-report", action="store_true",
                        help="do not write report.html into --out (rankshrink report DIR writes it later)")


def set_result(args: argparse.Namespace, payload: Any) -> None:
    """The JSON summary ``--json`` prints (or writes) once the command has finished."""
    args.json_result = payload


def json_to_stdout(args: argparse.Namespace) -> bool:
    return getattr(args, "json", None) == "-"


def write_run_report(args: argparse.Namespace, directory) -> str | None:
    """Write ``directory``/report.html unless ``--no-report``; the path, or None.

    The run's outputs are complete before this is called, so a report that cannot be drawn
    is a warning (with how to retry), not a failed command.
    """
    if getattr(args, "no_report", False):
        return None
    from ..html_report import write_html_report

    try:
        path = write_html_report(directory)
    except Exception as exc:  # the outputs are safe; say so and how to retry
        if getattr(args, "debug", False):
            raise
        command = " ".join(filter(None, [getattr(args, "command", None), getattr(args, "lora_command", None)]))
        print(f"rankshrink {command}: warning: report.html not written ({type(exc).__name__}: {exc}); the other "
              f"outputs are complete. Retry with: rankshrink report {directory}", file=sys.stderr)
        return None
    return str(path)


# --------------------------------------------------------------------------- checks before any work

def writes_output_dir(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Decorate a command's ``run(args)``: it runs holding the writers' lock of ``args.out``, so a second
    rankshrink writing the same directory exits 1 at once ("DIR is being written by another rankshrink
    (pid N)") instead of the two clean-ups deleting each other's files."""

    @functools.wraps(run)
    def locked(args: argparse.Namespace) -> int:
        out = getattr(args, "out", None)
        if not out:
            return run(args)
        from ..files import output_lock

        with output_lock(out):
            return run(args)

    return locked


def check_training_options(args: argparse.Namespace, *, prefix: str = "", epochs: str | None = None) -> None:
    """Check the training options :func:`rankshrink.cli.finetune.add_recovery_arguments` (``prefix``
    'finetune-') or the ``finetune`` command (no prefix) parsed, naming the flag, before any work.

    The rules are :class:`rankshrink.train.TrainConfig`'s; only the names in its messages change.
    ``epochs``: the flag that holds the epoch count (``--epochs``, ``--finetune``).
    """
    from ..train import TrainConfig

    dest = prefix.replace("-", "_")
    flags = {"lr": f"--{prefix}lr", "batch_size": f"--{prefix}batch-size", "patience": f"--{prefix}patience",
             "schedule": f"--{prefix}schedule", "distill_temperature": "--distill-temperature",
             "distill_weight": "--distill-weight", "seed": "--seed"}
    values = {field: getattr(args, f"{dest}{field}") for field in ("lr", "batch_size", "patience", "schedule")}
    values.update(distill_temperature=args.distill_temperature, distill_weight=args.distill_weight)
    if getattr(args, "distill_loss", "auto") != "auto" and not getattr(args, "distill", False):
        raise ConfigError(f"--distill-loss {args.distill_loss} applies with --distill; add --distill or drop it.")
    if values["lr"] is None:  # the default: finetune() picks it (see rankshrink.finetuning)
        del values["lr"]
    if isinstance(getattr(args, "seed", None), int):
        values["seed"] = args.seed
    if epochs is not None:
        flags["epochs"] = epochs
        values["epochs"] = getattr(args, epochs.lstrip("-").replace("-", "_"))
    try:
        TrainConfig(**values)
    except ConfigError as exc:
        text = str(exc)
        for field, flag in flags.items():
            if text.startswith(f"{field} "):
                raise ConfigError(flag + text[len(field):]) from None
        raise


def check_cache_and_out(cache: str | None, out: str | None) -> None:
    """``--cache`` must be a directory (or not exist yet) that neither is nor holds nor lies inside ``--out``."""
    if not cache:
        return
    from ..files import path_kind, real_output_dir

    kind = path_kind(cache)
    if kind not in ("missing", "directory"):
        raise ConfigError(f"--cache '{cache}' is a {kind}, not a directory; choose a cache directory.")
    if out:
        a, b = real_output_dir(cache), real_output_dir(out)
        if a == b or a in b.parents or b in a.parents:
            raise ConfigError(f"--cache '{cache}' and --out '{out}' overlap; the cache must lie outside the output "
                              "directory (and not contain it). Choose another --cache or --out.")


def check_input_paths(args: argparse.Namespace, *, weights_may_be_dir: bool = False) -> None:
    """The input files and directories a command names exist and are what they should be, before any work."""
    from ..files import require_dir, require_file
    from ..files.state_dict import check_weights_path

    weights = getattr(args, "weights", None)
    if weights and not (weights_may_be_dir and Path(weights).is_dir()):
        check_weights_path(weights)
    teacher = getattr(args, "teacher_weights", None)
    if teacher:
        check_weights_path(teacher)
    plan = getattr(args, "plan", None)
    if plan:
        require_file(plan, "plan file")
    compressed = getattr(args, "compressed", None)
    if compressed:
        require_dir(compressed, "--compressed directory", hint="Pass a directory written by rankshrink "
                                                                "compress or apply.")
    adapter = getattr(args, "adapter", None)
    if adapter:
        require_dir(adapter, "adapter directory", hint="Pass the --out directory of 'rankshrink lora train' "
                                                        "(or a PEFT adapter directory).")
