"""One workflow: a CLI that starts at once, the same options everywhere, examples and exit codes in --help,
``--json`` printing one document and nothing else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rankshrink
from rankshrink.cli import COMMANDS, build_parser, main

SRC = str(Path(rankshrink.__file__).resolve().parents[1])
HEAVY = ("torch", "numpy", "tensorly", "sklearn", "safetensors", "matplotlib", "tqdm", "scipy", "onnx")
# Every command and sub-command, as argv prefixes.
COMMAND_LINES = [[name] for name in COMMANDS if name != "lora"] + [["lora", "train"], ["lora", "merge"]]


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_import_no_heavy_module(flag):
    done = _python("import json, sys\nfrom rankshrink.cli import main\ncode = main([%r])\n"
                   "print(json.dumps({'code': code, 'heavy': sorted({m.split('.')[0] for m in sys.modules} & %r)}))"
                   % (flag, set(HEAVY)))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"code": 0, "heavy": []}


def test_python_dash_m_runs_the_cli():
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run([sys.executable, "-m", "rankshrink", "--version"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"rankshrink {rankshrink.__version__}"


def _help(capsys, argv: list[str]) -> str:
    assert main([*argv, "--help"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", COMMAND_LINES, ids=" ".join)
def test_every_help_documents_exit_codes_and_ends_with_examples(capsys, argv):
    text = _help(capsys, argv)
    assert "exit status:" in text
    for code in ("0 success", "1 user error", "2 internal error", "130 interrupted"):
        assert code in " ".join(text.split()), (argv, code)
    examples = text.rstrip().split("examples:\n", 1)[1].splitlines()
    assert 2 <= len(examples) <= 3, examples
    assert all((line.strip() + " ").startswith(f"rankshrink {' '.join(argv)} ") for line in examples), examples


def _options(argv: list[str]) -> set[str]:
    parser = build_parser(argv[0])
    actions = parser._subparsers._group_actions[0].choices[argv[0]]._actions  # the command's own parser
    if len(argv) > 1:
        sub = next(a for a in actions if a.__class__.__name__ == "_SubParsersAction")
        actions = sub.choices[argv[1]]._actions
    return {option for action in actions for option in action.option_strings}


@pytest.mark.parametrize("argv", COMMAND_LINES, ids=" ".join)
def test_the_same_options_everywhere(argv):
    options = _options(argv)
    assert {"--quiet", "--json", "--out"} <= options, argv
    if argv[0] in ("analyze", "compress", "apply", "finetune", "export", "lora"):
        assert {"--model", "--weights"} <= options, argv
    if argv[0] in ("analyze", "compress", "apply", "finetune", "export") or argv == ["lora", "train"]:
        assert "--data" in options, argv
    if argv[0] in ("compress", "apply", "finetune", "demo"):
        assert "--no-report" in options, argv


def _untrained_weights(tmp_path: Path) -> Path:
    from rankshrink.files import save_tensors
    from rankshrink.models import DigitsCNN

    torch.manual_seed(0)
    path = tmp_path / "w.safetensors"
    save_tensors(path, DigitsCNN().state_dict())
    return path


def test_exit_codes(tmp_path, capsys, monkeypatch):
    weights = _untrained_weights(tmp_path)
    analyze = ["analyze", "--model", "builtin:digits-cnn", "--weights", str(weights), "--input-shape", "1,8,8"]
    assert main(analyze) == 0
    capsys.readouterr()
    # A usage error (argparse would say 2) and a bad value are user errors.
    assert main(["compress", "--model", "builtin:digits-cnn"]) == 1
    assert "required" in capsys.readouterr().err
    assert main([*analyze[:-2], "--input-shape", "0,8"]) == 1
    assert "--input-shape" in capsys.readouterr().err
    assert main([]) == 1
    # A bug deep inside is an internal error; Ctrl-C is 130.
    import rankshrink.analysis

    def bug(*args, **kwargs):
        return {}["missing"]

    monkeypatch.setattr(rankshrink.analysis, "analyze", bug)
    assert main(analyze) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rankshrink analyze: internal error: KeyError") and len(err.splitlines()) == 1

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rankshrink.analysis, "analyze", interrupted)
    assert main(analyze) == 130
    assert "interrupted" in capsys.readouterr().err


def _one_json_document(out: str):
    assert out.endswith("\n") and out.count("\n") == 1, out[:400]
    return json.loads(out)


def test_json_prints_one_document_and_nothing_else(tmp_path, capsys):
    weights = _untrained_weights(tmp_path)
    analyze = ["analyze", "--model", "builtin:digits-cnn", "--weights", str(weights), "--input-shape", "1,8,8"]
    assert main([*analyze, "--json"]) == 0
    captured = capsys.readouterr()
    data = _one_json_document(captured.out)
    assert [layer["name"] for layer in data["layers"]] == ["features.0", "features.2", "classifier.1", "classifier.3"]
    assert "features.2" in captured.err  # the table still goes somewhere: stderr
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": {"classifier.1": {"method": "svd", "rank": 8}}}))
    out = tmp_path / "applied"
    assert main(["apply", "--model", "builtin:digits-cnn", "--weights", str(weights), "--plan", str(plan),
                 "--input-shape", "1,8,8", "--out", str(out), "--quiet", "--json"]) == 0
    captured = capsys.readouterr()
    summary = _one_json_document(captured.out)
    on_disk = json.loads((out / "summary.json").read_text())
    assert summary["report"] == str(out / "report.html") and (out / "report.html").is_file()
    assert {k: v for k, v in summary.items() if k not in ("out", "report", "files", "sizes")} == \
        {k: v for k, v in on_disk.items() if k not in ("files", "sizes")}
    # An error is still one document (and one line on stderr).
    assert main([*analyze[:-2], "--input-shape", "0,8", "--json"]) == 1
    captured = capsys.readouterr()
    error = _one_json_document(captured.out)
    assert error["exit_code"] == 1 and "--input-shape" in error["error"]
    assert len(captured.err.strip().splitlines()) == 1
    # --json FILE keeps the old behaviour: the tables on stdout, the JSON in FILE.
    target = tmp_path / "analysis.json"
    assert main([*analyze, "--json", str(target)]) == 0
    assert "features.2" in capsys.readouterr().out
    assert json.loads(target.read_text())["macs"] == data["macs"]


def test_a_report_that_cannot_be_drawn_does_not_fail_the_run(tmp_path, capsys, monkeypatch):
    """The outputs are complete before the report is drawn: a failure there is a warning with the retry."""
    import rankshrink.html_report
    from rankshrink.files import verify_output_set

    weights = _untrained_weights(tmp_path)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": {"classifier.1": {"method": "svd", "rank": 8}}}))
    out = tmp_path / "applied"

    def broken(summary, **kwargs):
        raise ValueError("no room on the page")

    monkeypatch.setattr(rankshrink.html_report, "render_html", broken)
    assert main(["apply", "--model", "builtin:digits-cnn", "--weights", str(weights), "--plan", str(plan),
                 "--input-shape", "1,8,8", "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: report.html not written (ValueError: no room on the page)" in err
    assert f"rankshrink report {out}" in err
    assert set(verify_output_set(out)["files"]) == {"model.safetensors", "plan.json"}
    assert not (out / "report.html").exists()
    monkeypatch.undo()
    assert main(["report", str(out)]) == 0 and (out / "report.html").is_file()
