"""``rankshrink report DIR``: write DIR/report.html from the run DIR holds (summary.json, plan.json).

``compress``, ``apply`` and ``finetune`` write the report themselves unless ``--no-report``;
this command (re)draws it, e.g. after installing matplotlib or for a run made with
``--no-report``. A directory without a run, or with a corrupt or partial summary.json, is
one clear line and exit status 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_command, add_output_options, set_result


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "report", help="write report.html for a run directory (compress, apply and finetune write it "
                                   "themselves)",
        description="Draw one self-contained HTML page (no network, no scripts) from the run in DIR: the summary, "
                    "the per-layer table, the singular-value spectra, metric-vs-rank curves, metric-vs-MACs of "
                    "every evaluated plan with the Pareto front, and how the run was made.",
        examples=["rankshrink report out/", "rankshrink report out/ --out ~/reports/digits.html",
                  "rankshrink report out/ --json"])
    parser.add_argument("dir", metavar="DIR", nargs="?", help="a directory written by compress, apply or finetune")
    parser.add_argument("--out", help="where to write the page (default: DIR/report.html)")
    add_output_options(parser, progress=False)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..html_report import write_html_report

    directory = args.dir
    if directory is None and args.json not in (None, "-") and Path(args.json).is_dir():
        directory, args.json = args.json, "-"  # 'report --json DIR': the directory was read as --json's FILE
    if directory is None:
        raise ConfigError("name the run directory: rankshrink report DIR (a directory written by compress, apply "
                          "or finetune).")
    if args.out:
        from . import OUTPUT_NAMES, _same

        for name in OUTPUT_NAMES:
            if name != "report.html" and _same(Path(args.out), Path(directory) / name):
                raise ConfigError(f"--out '{args.out}' is the run's own {name}; rankshrink never writes over its "
                                  "inputs. Choose another --out (e.g. report.html).")
    path = write_html_report(directory, out=args.out)
    print(f"wrote {path}")
    set_result(args, {"report": str(path), "run": str(directory)})
    return 0
