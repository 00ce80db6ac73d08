"""Fault injection: real ``rankshrink`` processes killed with SIGKILL, then rerun.

* ``compress``: killed at several points of its search (detected by watching the
  evaluation cache fill, not by sleeping), each rerun resumes and is killed again, and
  a last rerun finishes. Every rerun repeats no finished evaluation (evaluations run =
  total - entries already in the cache), a corrupted cache entry is dropped with a
  warning and recomputed, the result is bit-identical to an uninterrupted run, a
  previous complete output set in ``--out`` survives every kill, and the input weights
  file is never written.
* ``finetune``: killed mid-epoch once a checkpoint exists; the rerun resumes from the
  checkpoint and repeats no finished epoch.
* Multi-file outputs (``files.output_set`` as used by ``apply``): a process that dies
  (``os._exit``) between any two steps of replacing an existing output set leaves the
  old set or, after recovery, the new one - never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rankshrink
import rankshrink.models
from rankshrink.files import file_sha256, save_tensors, verify_output_set
from rankshrink.models import DigitsCNN

pytestmark = pytest.mark.slow

CLI = "import sys; from rankshrink.cli import main; sys.exit(main())"
TIMEOUT = 240  # seconds for any one subprocess (a busy machine is slow, never this slow)


@pytest.fixture(scope="module")
def trained_weights(tmp_path_factory):
    from rankshrink.models import load_builtin
    from rankshrink.search.evaluate import single_threaded

    with single_threaded():
        model, splits = load_builtin("digits-cnn", progress=False)
    path = tmp_path_factory.mktemp("weights") / "digits.safetensors"
    save_tensors(path, model.state_dict())
    return path


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               RANKSHRINK_CACHE=str(tmp_path / "user-cache"), XDG_CACHE_HOME=str(tmp_path / "xdg"),
               PYTHONWARNINGS="default")
    return env


def _start(args: list[str], tmp_path: Path, tag: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{tag}.log"
    handle = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-c", CLI, *args], stdout=handle, stderr=subprocess.STDOUT,
                            env=_env(tmp_path), cwd=tmp_path)
    handle.close()
    return proc, log


def _run(args: list[str], tmp_path: Path, tag: str) -> str:
    proc, log = _start(args, tmp_path, tag)
    code = proc.wait(TIMEOUT)
    text = log.read_text()
    assert code == 0, text[-3000:]
    return text


def _kill_when(proc: subprocess.Popen, ready, what: str) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` is true (polled every 10 ms)."""
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the process finished (exit {proc.returncode}) before {what}; nothing was interrupted")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL


def _entries(cache: Path) -> list[Path]:
    """Finished evaluation-cache entries (complete files; temporary files start with '.')."""
    return sorted(p for p in (cache / "evaluations").glob("*/*.json") if not p.name.startswith("."))


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------- compress

def test_killed_compress_resumes_without_repeating_evaluations(tmp_path, trained_weights, monkeypatch):
    from rankshrink.cli import main

    weights = tmp_path / "model.safetensors"
    shutil.copy(trained_weights, weights)
    input_hash = file_sha256(weights)
    common = ["compress", "--model", "builtin:digits-cnn", "--weights", str(weights), "--data", "builtin:digits",
              "--tolerance", "0.01", "--methods", "svd,weight", "--seed", "0", "--quiet",
              # Resuming is about evaluations; fresh latency measurements in each process could pick another plan.
              "--ignore-latency"]

    # Reference: an uninterrupted run with its own cache (in-process: saves one interpreter start).
    monkeypatch.setenv("RANKSHRINK_CACHE", str(tmp_path / "ref-user-cache"))
    reference = tmp_path / "reference"
    assert main([*common, "--out", str(reference), "--cache", str(tmp_path / "ref-cache")]) == 0
    ref_summary = json.loads((reference / "summary.json").read_text())
    total = ref_summary["evaluations"]
    assert ref_summary["evaluations_cached"] == 0 and ref_summary["seed"] == 0
    assert total >= 12, "the search is too short to interrupt at several points"

    # --out already holds a complete earlier result: every kill must leave it as it was.
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "notes.txt").write_text("the user's own file")
    before = _snapshot(out)
    cache = tmp_path / "cache"
    args = [*common, "--out", str(out), "--cache", str(cache), "--force"]

    done = 0
    measured = []
    for point, target in enumerate((2, total // 3, (2 * total) // 3)):
        proc, log = _start(args, tmp_path, f"killed-{point}")
        target = max(target, done + 1)  # each run must get further than the last
        _kill_when(proc, lambda target=target: len(_entries(cache)) >= target, f"{target} cached evaluations")
        now = len(_entries(cache))
        assert now > done
        measured.append((target, now))
        done = now
        assert _snapshot(out) == before, f"kill point {point} changed --out"
        assert file_sha256(weights) == input_hash
    assert done < total, f"the kills came too late to test resuming: {measured} of {total}"

    # A corrupted entry (e.g. a disk error) is detected by its checksum, dropped and recomputed.
    victim = _entries(cache)[0]
    victim.write_text(victim.read_text().replace('"value": ', '"value": 1', 1))
    text = _run(args, tmp_path, "resumed")
    assert "corrupt" in text and str(victim.name) in text, text[-2000:]

    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.safetensors", "notes.txt", "plan.json",
                                                     "report.html", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluations_cached"] == done - 1
    assert summary["evaluations"] == total - done + 1, (measured, summary["evaluations"], total)
    assert summary["evaluations"] + summary["evaluations_cached"] == total
    assert summary["seed"] == 0
    # Same plan and bit-identical weights as the uninterrupted run; the user's file is kept.
    assert (out / "plan.json").read_bytes() == (reference / "plan.json").read_bytes()
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert file_sha256(weights) == input_hash
    model = rankshrink.load(DigitsCNN, out)
    assert torch.isfinite(model(torch.rand(2, 1, 8, 8))).all()
    print(f"kill points (wanted, cached at kill): {measured}; total {total}; resumed run evaluated "
          f"{summary['evaluations']} (incl. 1 corrupted entry), read {summary['evaluations_cached']} from cache")


# --------------------------------------------------------------------------- finetune

def test_killed_finetune_resumes_from_its_checkpoint(tmp_path, trained_weights):
    from rankshrink.plan import Plan
    from rankshrink.surgery import save

    base = rankshrink.models.load_model_spec("builtin:digits-cnn", trained_weights)
    plan = Plan.from_mapping({"features.2": ("weight", 8), "classifier.1": ("svd", 16)})
    compressed_dir = tmp_path / "compressed"
    save(rankshrink.apply(base, plan), plan, compressed_dir)
    input_hashes = {p.name: file_sha256(p) for p in compressed_dir.iterdir()}

    out = tmp_path / "out"
    checkpoint = out / ".finetune-checkpoint" / "train_checkpoint.pt"
    args = ["finetune", "--model", "builtin:digits-cnn", "--weights", str(compressed_dir), "--epochs", "3",
            "--batch-size", "16", "--out", str(out), "--no-progress"]
    proc, _ = _start(args, tmp_path, "finetune-killed")
    _kill_when(proc, checkpoint.is_file, "the first epoch's checkpoint")
    saved = torch.load(checkpoint, weights_only=True)
    finished = saved["epoch"]
    assert 1 <= finished < 3
    assert not (out / "model.safetensors").exists()  # no outputs before the run completes

    text = _run(args, tmp_path, "finetune-resumed")  # same command, no --force: resumes
    assert "resuming" in text
    summary = json.loads((out / "summary.json").read_text())
    result = summary["finetune"]
    assert result["resumed_from_epoch"] == finished
    assert result["epochs_run"] == 3
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    # The finished epochs come from the checkpoint (same measured times), not from running them again.
    assert history[:finished] == saved["history"]
    assert not checkpoint.parent.exists()
    assert {p.name: file_sha256(p) for p in compressed_dir.iterdir()} == input_hashes
    rankshrink.load(DigitsCNN, out)
    print(f"finetune killed after {finished} finished epoch(s); the rerun ran epochs {finished + 1}..3")


# --------------------------------------------------------------------------- output sets

def test_compress_outputs_are_one_verifiable_set(tmp_path):
    from rankshrink.cli.compress import write_outputs
    from rankshrink.plan import Plan

    model = DigitsCNN()
    plan = Plan.from_mapping({"classifier.3": ("svd", 4)})
    small = rankshrink.apply(model, plan)
    out = tmp_path / "out"
    write_outputs(small, plan, {"seed": 0}, out, force=False)
    (out / "notes.txt").write_text("mine")
    write_outputs(small, plan, {"seed": 1}, out, force=True)
    summary = verify_output_set(out)
    assert summary is not None and set(summary["files"]) == {"model.safetensors", "plan.json"}


def _replace_output_set_and_die(out: Path, crash_at: int) -> None:
    """In a forked child: replace ``out``'s set, dying (no cleanup at all) at os.replace number ``crash_at``."""
    from rankshrink import files

    calls = {"n": 0}
    real_replace = os.replace

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == crash_at:
            os._exit(9)  # like SIGKILL: no finally blocks, no cleanup
        return real_replace(src, dst)

    os.replace = replace
    with files.output_set(out, force=True, summary={"run": "new"}) as stage:
        (stage / "model.safetensors").write_bytes(b"new weights")
        (stage / "plan.json").write_text('{"new": true}')
    os._exit(0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_output_set_killed_between_any_two_renames_is_old_or_new(tmp_path):
    """Die at every os.replace while replacing a complete set in a non-empty directory."""
    from rankshrink.files import output_set, recover_output_dir

    outcomes = []
    for crash_at in range(1, 12):
        out = tmp_path / f"out{crash_at}"
        with output_set(out, summary={"run": "old"}) as stage:
            (stage / "model.safetensors").write_bytes(b"old weights")
            (stage / "plan.json").write_text('{"old": true}')
        (out / "mine.txt").write_text("user file")
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            try:
                _replace_output_set_and_die(out, crash_at)
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        assert code in (0, 9), code
        finished = code == 0
        recover_output_dir(out)  # what any later writer does first (readers refuse an interrupted set)
        summary = verify_output_set(out)
        assert summary is not None
        state = summary["run"]
        expected = {"old": (b"old weights", '{"old": true}'), "new": (b"new weights", '{"new": true}')}[state]
        assert (out / "model.safetensors").read_bytes() == expected[0]
        assert (out / "plan.json").read_text() == expected[1]
        assert (out / "mine.txt").read_text() == "user file"
        assert sorted(p.name for p in out.iterdir()) == ["mine.txt", "model.safetensors", "plan.json",
                                                         "summary.json"]
        assert not any(p.name.endswith("rankshrink-staging") for p in tmp_path.iterdir())
        outcomes.append((crash_at, state, finished))
        if finished:
            break
    states = [state for _, state, _ in outcomes]
    assert "old" in states and "new" in states and outcomes[-1][2], outcomes


def test_output_set_into_a_new_directory_appears_whole(tmp_path):
    from rankshrink.files import output_set, staging_path

    out = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        with output_set(out, summary={}) as stage:
            (stage / "model.safetensors").write_bytes(b"x")
            raise RuntimeError("killed while writing")
    assert not out.exists() and not staging_path(out).exists()
    with output_set(out, summary={"seed": 3}) as stage:
        (stage / "model.safetensors").write_bytes(b"x")
    summary = verify_output_set(out)
    assert summary["seed"] == 3 and set(summary["files"]) == {"model.safetensors"}
    (out / "model.safetensors").write_bytes(b"y")  # a file swapped behind our back is detected
    with pytest.raises(rankshrink.errors.FileFormatError, match="model.safetensors.*checksum"):
        verify_output_set(out)
