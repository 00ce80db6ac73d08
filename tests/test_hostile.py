"""Hostile folders, concurrent runs, full disks and unwritable caches (issue 11, round 2).

The one-line refusals are rows of ``docs/BAD_INPUTS.md`` (``tests/test_reliability.py``);
here are the behaviours that end in success or need more than one process:

* a planted staging sibling or marker never makes a command delete or replace a file outside
  the directory it writes, and a command that only reads a directory never writes to it
  (the three reported cases, then a Hypothesis property over random hostile contents);
* a second writer of one ``--out`` exits 1 naming the first one's pid, and two racing
  ``compress`` runs never report success without a complete set;
* a full disk (a real 1 MiB tmpfs in a user namespace) says "no space left on DIR" and keeps
  the old outputs;
* caches that cannot be written warn once and the run goes on; evaluation-cache entries are
  bound to the fingerprints they were computed for;
* ``--out`` as a symbolic link to an empty or missing directory; Ctrl-C during a built-in
  model's training really resumes on the rerun.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch

CLI = "import sys; from rankshrink.cli import main; sys.exit(main())"
DIGITS = ["--model", "builtin:digits-cnn"]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    from rankshrink.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Untrained digits-CNN weights, a one-layer plan, and a compressed set written by `apply`."""
    from rankshrink.files import save_tensors
    from rankshrink.models import BUILTIN_MODELS

    d = tmp_path_factory.mktemp("inputs")
    weights = d / "w.safetensors"
    save_tensors(weights, BUILTIN_MODELS["digits-cnn"].create().state_dict())
    plan = d / "plan.json"
    plan.write_text(json.dumps({"layers": {"classifier.1": {"method": "svd", "rank": 8}}}))
    compressed = d / "set"
    code, _, err = run_cli(["apply", *DIGITS, "--weights", str(weights), "--plan", str(plan), "--out", str(compressed)])
    assert code == 0, err
    return {"weights": weights, "plan": plan, "set": compressed}


def _apply(inputs, out: Path, *extra: str) -> list[str]:
    return ["apply", *DIGITS, "--weights", str(inputs["weights"]), "--plan", str(inputs["plan"]), "--out", str(out),
            *extra]


def _copy_set(inputs, where: Path) -> Path:
    shutil.copytree(inputs["set"], where)
    return where


def _plant(directory: Path, order: list[str], files: dict[str, bytes]) -> Path:
    """A staging sibling of ``directory`` marked complete, as a killed writer (or an attacker) leaves it."""
    staging = directory.parent / f".{directory.name}.rankshrink-staging"
    staging.mkdir()
    for name, data in files.items():
        (staging / name).write_bytes(data)
    (staging / ".rankshrink-complete").write_text(json.dumps({"order": order}))
    return staging


# --------------------------------------------------------------------------- the three reported cases

def test_a_marker_naming_other_files_never_makes_a_reader_delete_them(tmp_path, inputs):
    """`export --compressed set` with a planted marker listing an absolute path and a '..' path."""
    victim, other = tmp_path / "victim.txt", tmp_path / "elsewhere" / "victim.txt"
    victim.write_text("precious")
    other.parent.mkdir()
    other.write_text("precious too")
    target = _copy_set(inputs, tmp_path / "deep" / "set")
    staging = _plant(target, [str(victim), "../../elsewhere/victim.txt", "summary.json"],
                     {"summary.json": b"{}"})
    before = {p: p.read_bytes() for p in target.iterdir()}
    code, _, err = run_cli(["export", *DIGITS, "--weights", str(inputs["weights"]), "--compressed", str(target),
                            "--out", str(tmp_path / "m.onnx"), "--runs", "1"])
    assert code == 0, err
    assert victim.read_text() == "precious" and other.read_text() == "precious too"
    assert {p: p.read_bytes() for p in target.iterdir()} == before  # the reader wrote nothing into the set
    assert (staging / ".rankshrink-complete").is_file()  # ... and left the planted sibling alone


def test_apply_force_with_a_dotdot_marker_keeps_the_victim(tmp_path, inputs):
    """A writer discards a staging directory whose marker names paths, and writes its own set."""
    from rankshrink.files import verify_output_set

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = _copy_set(inputs, tmp_path / "a" / "set")
    (target / "keep.txt").write_text("mine")
    staging = _plant(target, ["../../victim.txt", "summary.json"], {"summary.json": b"{}"})
    code, _, err = run_cli(_apply(inputs, target, "--force"))
    assert code == 0, err
    assert victim.read_text() == "precious"
    assert not staging.exists() and (target / "keep.txt").read_text() == "mine"
    assert set(verify_output_set(target)["files"]) == {"model.safetensors", "plan.json"}


def test_a_planted_model_never_replaces_the_users_model_in_a_reader(tmp_path, inputs):
    """`finetune --weights set --epochs 0`: a planted model.safetensors in a staging sibling stays there."""
    from rankshrink.files import file_sha256

    target = _copy_set(inputs, tmp_path / "set")
    mine = file_sha256(target / "model.safetensors")
    _plant(target, ["model.safetensors", "summary.json"], {"model.safetensors": b"planted", "summary.json": b"{}"})
    code, _, err = run_cli(["finetune", *DIGITS, "--weights", str(target), "--epochs", "0", "--out",
                            str(tmp_path / "tuned"), "--no-progress"])
    assert code == 0, err
    assert file_sha256(target / "model.safetensors") == mine
    assert (tmp_path / "tuned" / "model.safetensors").is_file()


def test_a_summary_listing_a_huge_file_is_refused_by_size_without_reading_it(tmp_path, inputs):
    """Only regular files inside the set are hashed, and only up to the size the summary records."""
    from rankshrink.errors import FileFormatError
    from rankshrink.files import verify_output_set

    target = _copy_set(inputs, tmp_path / "set")
    summary = json.loads((target / "summary.json").read_text())
    with open(target / "model.safetensors", "ab") as handle:  # grows by 1 GiB without writing it (sparse)
        handle.truncate((target / "model.safetensors").stat().st_size + (1 << 30))
    start = time.perf_counter()
    with pytest.raises(FileFormatError, match="model.safetensors.*does not match"):
        verify_output_set(target)
    assert time.perf_counter() - start < 5  # hashing 1 GiB would take far longer on this machine
    assert summary["sizes"]["model.safetensors"] < (1 << 20)


# --------------------------------------------------------------------------- concurrent writers

_HOLD = """
import sys, time
from rankshrink.files import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_exits_at_once_naming_the_first(tmp_path, inputs):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for argv in (_apply(inputs, out), ["compress", *DIGITS, "--weights", str(inputs["weights"]), "--tolerance",
                                           "0.01", "--out", str(out), "--quiet", "--no-cache"],
                     ["finetune", *DIGITS, "--weights", str(inputs["set"]), "--epochs", "0", "--out", str(out)]):
            code, _, err = run_cli(argv)
            assert code == 1, err
            assert f"'{out}' is being written by another rankshrink (pid {holder.pid})" in err, err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait(30)
    assert run_cli(_apply(inputs, out))[0] == 0  # the kernel dropped the dead holder's lock


@pytest.mark.slow
def test_racing_compress_runs_never_report_success_without_a_model(tmp_path, inputs):
    """The reported race: two `compress` runs into one --out; each run that exits 0 leaves a complete set."""
    from rankshrink.files import verify_output_set

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1",
               RANKSHRINK_CACHE=str(tmp_path / "cache"))
    for trial in range(2):
        out = tmp_path / f"out{trial}"
        argv = ["compress", *DIGITS, "--weights", str(inputs["weights"]), "--max-params", "0.5", "--methods", "svd",
                "--fit", "weights", "--out", str(out), "--force", "--quiet", "--no-cache",
                # untrained weights: the sanity check would (rightly) stop them; latency and ONNX are not the point
                "--min-baseline", "0", "--ignore-latency", "--no-export"]
        procs = [subprocess.Popen([sys.executable, "-c", CLI, *argv], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, env=env, text=True) for _ in range(2)]
        results = [(p.wait(240), p.stdout.read()) for p in procs]
        assert any(code == 0 for code, _ in results), results
        for code, text in results:
            assert code in (0, 1), text
            if code == 1:
                assert "is being written by another rankshrink (pid" in text, text
        summary = verify_output_set(out)
        assert set(summary["files"]) == {"model.safetensors", "plan.json"}


# --------------------------------------------------------------------------- a full disk

def _tmpfs_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


_FULL_DISK = """
mount -t tmpfs -o size=1m tmpfs "$MOUNT" || exit 99
mkdir "$MOUNT/out"
echo old > "$MOUNT/out/model.safetensors"
echo '{"old": true}' > "$MOUNT/out/plan.json"
dd if=/dev/zero of="$MOUNT/filler" bs=1k count=990 2>/dev/null
"$@"
echo "exit=$?"
head -c 4 "$MOUNT/out/model.safetensors"; echo
ls -a "$MOUNT"
"""


@pytest.mark.slow
@pytest.mark.skipif(not _tmpfs_available(), reason="needs unshare with user and mount namespaces (a real tmpfs)")
def test_a_full_disk_names_the_directory_and_keeps_the_old_outputs(tmp_path, inputs):
    """A 1 MiB tmpfs with about 24 kB free: the 45 kB model does not fit; safetensors reports ENOSPC."""
    mount = tmp_path / "small"
    mount.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), MOUNT=str(mount))
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", _FULL_DISK, "sh",
                             sys.executable, "-c", CLI, *_apply(inputs, mount / "out", "--force")],
                            capture_output=True, text=True, env=env, timeout=240)
    text = result.stdout + result.stderr
    assert "exit=1" in text, text
    lines = [line for line in text.splitlines() if line.startswith("rankshrink apply: error:")]
    assert len(lines) == 1 and f"no space left on {mount / 'out'}" in lines[0], text
    assert "Traceback" not in text and "SafetensorError" not in text, text
    assert "\nold\n" in text, text  # the old model file is intact
    assert ".out.rankshrink-staging" not in text, text  # nothing half-written is left beside it


@pytest.mark.slow
@pytest.mark.skipif(not _tmpfs_available(), reason="needs unshare with user and mount namespaces (a real tmpfs)")
def test_a_full_disk_while_checkpointing_is_named_too(tmp_path, inputs):
    """torch.save reports a full disk only as "unexpected pos ..."; the message still says no space left."""
    mount = tmp_path / "small"
    mount.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), MOUNT=str(mount))
    argv = ["finetune", *DIGITS, "--weights", str(inputs["set"]), "--epochs", "1", "--out", str(mount / "out"),
            "--force", "--no-progress"]
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", _FULL_DISK, "sh",
                             sys.executable, "-c", CLI, *argv], capture_output=True, text=True, env=env, timeout=240)
    text = result.stdout + result.stderr
    assert "exit=1" in text, text
    lines = [line for line in text.splitlines() if line.startswith("rankshrink finetune: error:")]
    assert len(lines) == 1 and f"no space left on {mount / 'out'}" in lines[0], text
    assert "unexpected pos" not in text and "Traceback" not in text, text
    assert "\nold\n" in text, text


@pytest.mark.slow
@pytest.mark.skipif(not _tmpfs_available(), reason="needs unshare with user and mount namespaces (a real tmpfs)")
def test_a_full_model_cache_warns_and_the_command_goes_on(tmp_path):
    """The built-in model's checkpoints and weights do not fit the cache's disk: warnings, then success."""
    mount = tmp_path / "small"
    mount.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), MOUNT=str(mount),
               RANKSHRINK_CACHE=str(mount / "cache"), OMP_NUM_THREADS="1", PYTHONWARNINGS="default")
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", _FULL_DISK, "sh",
                             sys.executable, "-c", CLI, "analyze", *DIGITS], capture_output=True, text=True,
                            env=env, timeout=400)
    text = result.stdout + result.stderr
    assert "exit=0" in text, text
    assert "classifier.1" in text  # the analysis table
    assert text.count("cannot write the built-in model cache") == 1, text  # one warning, then no more tries
    assert "no space left on" in text and "Traceback" not in text, text


def test_a_gzip_bomb_is_never_inflated(tmp_path):
    """64 MiB of zeros behind a header declaring 1,280 bytes: refused after reading 1,281 of them."""
    import gzip
    import tracemalloc

    import numpy as np

    from rankshrink.data import read_idx
    from rankshrink.errors import FileFormatError

    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb", compresslevel=9) as handle:
        handle.write(bytes([0, 0, 8, 3]) + np.array([20, 8, 8], ">u4").tobytes())
        for _ in range(64):
            handle.write(bytes(1 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(FileFormatError, match="more data than the 1,280 bytes its header declares"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak  # far below the 64 MiB a whole read would take


# --------------------------------------------------------------------------- caches

def test_an_evaluation_cache_that_cannot_be_written_warns_once_and_goes_on(tmp_path, inputs, recwarn):
    from rankshrink.data import load_data
    from rankshrink.models import BUILTIN_MODELS
    from rankshrink.search import CacheWarning, compress

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "evaluations").write_text("a file where the entries' directory should be")
    (cache / "proxies").write_text("and another")
    model = BUILTIN_MODELS["digits-cnn"].create()
    result = compress(model, load_data("builtin:digits"), budget={"params": 0.5}, methods=["svd"], fit="weights",
                      cache=cache, progress=False, min_baseline=0.0)  # untrained: past the sanity check
    assert result.evaluations >= 1 and result.ratio("params") <= 0.5
    cache_warnings = [w for w in recwarn if issubclass(w.category, CacheWarning)]
    assert len(cache_warnings) == 1 and "cannot write the evaluation cache" in str(cache_warnings[0].message)


def test_a_model_cache_that_cannot_be_written_warns_once_and_goes_on(tmp_path, recwarn):
    from rankshrink.data import load_data
    from rankshrink.metrics import accuracy
    from rankshrink.models import load_builtin

    blocked = tmp_path / "cache"
    blocked.mkdir()
    (blocked / "models").write_text("a file where the models directory should be")
    splits = load_data("builtin:digits")
    model, _ = load_builtin("mnist-mlp", data=splits, cache_dir=blocked, progress=False)
    assert accuracy(model, splits.val) > 0.8
    messages = [str(w.message) for w in recwarn if "cannot write the built-in model cache" in str(w.message)]
    assert len(messages) == 1, messages


def test_evaluation_cache_entries_are_bound_to_what_they_were_computed_for(tmp_path):
    """An entry moved to another key (another model, same plan) is refused and recomputed, even with a
    recomputed checksum; a matching entry is used."""
    from rankshrink.search.cache import CacheWarning, EvaluationCache, _checksum, cache_key

    cache = EvaluationCache(tmp_path)
    bound_a = {"model": "a" * 64, "data": "d" * 64, "metric": "accuracy", "plan": "{}", "factorize": "o"}
    bound_b = dict(bound_a, model="b" * 64)
    key_a = cache_key(bound_a["model"], "{}", "accuracy", "d" * 64, "o")
    key_b = cache_key(bound_b["model"], "{}", "accuracy", "d" * 64, "o")
    cache.put(key_a, 0.25, bound=bound_a)
    assert cache.get(key_a, bound=bound_a)["value"] == 0.25
    forged = json.loads(cache.path(key_a).read_text())
    forged.update(key=key_b, value=0.99, checksum=_checksum(key_b, 0.99, forged["bound"]))
    cache.path(key_b).parent.mkdir(parents=True, exist_ok=True)
    cache.path(key_b).write_text(json.dumps(forged))
    with pytest.warns(CacheWarning, match="for another model"):
        assert cache.get(key_b, bound=bound_b) is None
    assert not cache.path(key_b).exists()


def test_compress_stores_the_model_and_data_fingerprints_in_its_entries(tmp_path):
    from rankshrink.data import load_data
    from rankshrink.fingerprint import code_fingerprint, dataset_fingerprint, module_fingerprint, object_fingerprint
    from rankshrink.models import BUILTIN_MODELS
    from rankshrink.search import compress

    model = BUILTIN_MODELS["digits-cnn"].create()
    splits = load_data("builtin:digits")
    compress(model, splits, budget={"params": 0.5}, methods=["svd"], fit="weights", cache=tmp_path, progress=False,
             min_baseline=0.0)  # untrained weights: past the sanity check
    entries = [json.loads(p.read_text()) for p in (tmp_path / "evaluations").glob("*/*.json")]
    # The model is its weights and the code that runs them (another wrapper of the same weights is another model).
    expected = object_fingerprint({"weights": module_fingerprint(model), "code": code_fingerprint(model)})
    assert entries and all(e["bound"]["model"] == expected for e in entries)
    assert all(e["bound"]["data"] == dataset_fingerprint(splits.val) for e in entries)


# --------------------------------------------------------------------------- --out as a symbolic link

@pytest.mark.parametrize("target_exists", [True, False])
def test_out_may_be_a_symlink_to_an_empty_or_missing_directory(tmp_path, inputs, target_exists):
    from rankshrink.files import verify_output_set

    target = tmp_path / "real" / "out"
    if target_exists:
        target.mkdir(parents=True)
    else:
        target.parent.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    code, _, err = run_cli(_apply(inputs, link))
    assert code == 0, err
    assert link.is_symlink() and set(verify_output_set(link)["files"]) == {"model.safetensors", "plan.json"}
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors", "plan.json", "report.html", "summary.json"]


# --------------------------------------------------------------------------- Ctrl-C in built-in training

@pytest.mark.slow
def test_ctrl_c_during_builtin_training_resumes_on_the_rerun(tmp_path):
    """SIGINT once the first epochs are checkpointed: exit 130; the rerun resumes (it says so) and
    caches weights bit-identical to an uninterrupted training."""
    from rankshrink.data import load_data
    from rankshrink.files import load_tensors
    from rankshrink.models import builtin_weights_path, load_builtin

    splits = load_data("builtin:digits")
    reference, _ = load_builtin("digits-cnn", data=splits, cache_dir=tmp_path / "reference", progress=False)
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), RANKSHRINK_CACHE=str(cache), OMP_NUM_THREADS="1")
    argv = [sys.executable, "-c", CLI, "analyze", *DIGITS]
    # A shell runs background jobs with SIGINT ignored, and an ignored signal is inherited: reset it, or
    # Python would install no KeyboardInterrupt handler in the child and Ctrl-C would do nothing.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    checkpoints = cache / "models"
    deadline = time.monotonic() + 240
    while not list(checkpoints.glob(".*.training/train_checkpoint.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, text
    assert "interrupted" in text and "a rerun resumes it" in text
    checkpoint = next(checkpoints.glob(".*.training/train_checkpoint.pt"))
    done = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 1 <= done < 20
    rerun = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=240)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming the training of digits-cnn from its checkpoint" in rerun.stderr
    cached = load_tensors(builtin_weights_path("digits-cnn", splits.fingerprint, cache))
    assert all(torch.equal(cached[k], v) for k, v in reference.state_dict().items())
    assert not checkpoint.parent.exists()  # removed once the trained weights are cached


# --------------------------------------------------------------------------- the property

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    st = None

_NAMES = ["model.safetensors", "plan.json", "summary.json", "keep.txt", "../outside/victim.txt",
          "../../outside/victim.txt", "{victim}", "/dev/zero", "sub/model.safetensors", ".", "..", "", "x" * 300,
          ".rankshrink-complete", ".finetune-checkpoint", "train_checkpoint.pt", "a\nb"]
_STAGING_KINDS = ["none", "dir", "link-to-outside-dir", "link-to-victim", "file"]
_LOCK_KINDS = ["none", "file", "link-to-victim", "hardlink-to-victim", "fifo"]


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed): its kind and content."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            mode = os.lstat(path).st_mode
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(mode):
                found[rel] = ("link", os.readlink(path))
            elif stat.S_ISREG(mode):
                found[rel] = ("file", path.read_bytes())
            elif stat.S_ISDIR(mode):
                found[rel] = ("dir",)
            else:
                found[rel] = ("special", stat.S_IFMT(mode))
    return found


def _outside(snapshot: dict[str, tuple], written: str) -> dict[str, tuple]:
    """The entries a command that writes ``written`` must leave alone (rankshrink's own siblings of it aside)."""
    parent, _, name = written.rpartition("/")
    prefix = f"{parent}/" if parent else ""
    mine = (written, f"{prefix}.{name}.rankshrink-staging", f"{prefix}.{name}.rankshrink-lock")
    return {rel: v for rel, v in snapshot.items() if not any(rel == m or rel.startswith(m + "/") for m in mine)}


if st is not None:
    @st.composite
    def hostile_folder(draw):
        names = st.sampled_from(_NAMES)
        return {
            "command": draw(st.sampled_from(["apply --force", "apply", "finetune --force", "finetune reader",
                                             "export reader"])),
            "target": draw(st.sampled_from(["set", "empty", "missing"])),
            "inside": draw(st.dictionaries(names, st.sampled_from(["bytes", "link-to-victim", "link-to-zero", "fifo",
                                                                   "link-to-outside-dir"]), max_size=3)),
            "summary": draw(st.none() | st.dictionaries(names, st.sampled_from(["0" * 64, "bad", 7]), max_size=3)),
            "sizes": draw(st.booleans()),
            "staging": draw(st.sampled_from(_STAGING_KINDS)),
            "marker": draw(st.none() | st.just("garbage") | st.lists(names, max_size=4)),
            "staged": draw(st.dictionaries(names, st.sampled_from(["bytes", "link-to-victim", "hardlink-to-victim"]),
                                           max_size=3)),
            "lock": draw(st.sampled_from(_LOCK_KINDS)),
        }

    def _place(path: Path, kind: str, victim: Path) -> None:
        if kind == "bytes":
            path.write_bytes(b"planted " + path.name.encode())
        elif kind == "link-to-victim":
            path.symlink_to(victim)
        elif kind == "link-to-zero":
            path.symlink_to("/dev/zero")
        elif kind == "hardlink-to-victim":
            os.link(victim, path)
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "link-to-outside-dir":
            path.symlink_to(victim.parent, target_is_directory=True)

    def _build(root: Path, case: dict, inputs: dict[str, Path]) -> Path:
        outside = root / "outside"
        (outside / "sub").mkdir(parents=True)
        victim = outside / "victim.txt"
        victim.write_text("precious")
        (outside / "sub" / "model.safetensors").write_text("also precious")
        target = root / "work" / "target"
        target.parent.mkdir()
        if case["target"] == "set":
            shutil.copytree(inputs["set"], target)
        elif case["target"] == "empty":
            target.mkdir()
        if target.is_dir():
            for name, kind in case["inside"].items():
                if "/" not in name and name not in ("", ".", "..") and len(name) < 200 and "\n" not in name:
                    (target / name).unlink(missing_ok=True)
                    _place(target / name, kind, victim)
            if case["summary"] is not None:
                listed = {name.replace("{victim}", str(victim)): digest for name, digest in case["summary"].items()}
                record = {"files": listed}
                if case["sizes"]:
                    record["sizes"] = {name: 10 for name in listed}
                (target / "summary.json").unlink(missing_ok=True)
                (target / "summary.json").write_text(json.dumps(record))
        staging = target.parent / ".target.rankshrink-staging"
        kind = case["staging"]
        if kind == "dir":
            staging.mkdir()
            for name, how in case["staged"].items():
                if "/" not in name and name not in ("", ".", "..") and len(name) < 200 and "\n" not in name:
                    _place(staging / name, how, victim)
            if case["marker"] is not None:
                (staging / ".rankshrink-complete").unlink(missing_ok=True)  # never write through a planted link
            if case["marker"] == "garbage":
                (staging / ".rankshrink-complete").write_text("{not json")
            elif case["marker"] is not None:
                order = [name.replace("{victim}", str(victim)) for name in case["marker"]]
                (staging / ".rankshrink-complete").write_text(json.dumps({"order": order}))
        elif kind == "link-to-outside-dir":
            staging.symlink_to(outside, target_is_directory=True)
        elif kind == "link-to-victim":
            staging.symlink_to(victim)
        elif kind == "file":
            staging.write_text("planted")
        lock = target.parent / ".target.rankshrink-lock"
        if case["lock"] in ("link-to-victim", "hardlink-to-victim", "fifo"):
            _place(lock, case["lock"], victim)
        elif case["lock"] == "file":
            lock.write_text("garbage")
        return target

    def _command(case: dict, target: Path, root: Path, inputs: dict[str, Path]) -> tuple[list[str], str]:
        """The argv and the directory it may write (relative to ``root``)."""
        if case["command"].startswith("apply"):
            extra = ["--force"] if "force" in case["command"] else []
            return _apply(inputs, target, *extra), "work/target"
        if case["command"] == "finetune --force":
            return ["finetune", *DIGITS, "--weights", str(inputs["set"]), "--epochs", "1", "--out", str(target),
                    "--force", "--no-progress"], "work/target"
        if case["command"] == "finetune reader":
            return ["finetune", *DIGITS, "--weights", str(target), "--epochs", "0", "--out", str(root / "result"),
                    "--no-progress"], "result"
        return ["export", *DIGITS, "--weights", str(inputs["weights"]), "--compressed", str(target), "--out",
                str(root / "result" / "m.onnx"), "--runs", "1"], "result"

    def _alarm(signum, frame):
        raise TimeoutError("a rankshrink command hung on the hostile folder (read a FIFO or device?)")

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])
    @given(case=hostile_folder())
    def test_no_command_changes_a_file_outside_the_directory_it_writes(inputs, case):
        """For any files, links, FIFOs, summaries, markers and locks planted in and beside an output
        directory, no rankshrink command changes (or creates, or removes) anything outside the directory
        it was asked to write, rankshrink's own hidden siblings of it aside; readers write nothing there."""
        if case["command"] == "export reader":
            pytest.importorskip("onnxruntime")
        root = Path(tempfile.mkdtemp(prefix="rs-hostile-"))
        try:
            target = _build(root, case, inputs)
            argv, written = _command(case, target, root, inputs)
            before = _outside(_snapshot(root), written)
            previous = signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(120)
            try:
                code, _, err = run_cli(argv)
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, previous)
            assert code in (0, 1), err
            assert "internal error" not in err and "Traceback" not in err, err
            assert _outside(_snapshot(root), written) == before, (case, err)
            assert (root / "outside" / "victim.txt").read_text() == "precious"
        finally:
            shutil.rmtree(root, ignore_errors=True)
