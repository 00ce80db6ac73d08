"""Recovery fine-tuning: what trains, distillation, keep-best, determinism, CLI (resume, --force), workflow."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import rankshrink as rs
import rankshrink.finetuning as ft
from rankshrink.calibration import calibrate
from rankshrink.cli import main
from rankshrink.data import load_data
from rankshrink.errors import ConfigError
from rankshrink.metrics import accuracy
from rankshrink.train import train
from rankshrink.workflow import compress_and_recover

MODEL_FILE = '''
import torch
from torch import nn


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 8 * 8, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def make():
    torch.manual_seed(0)
    return Small()
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small conv+BatchNorm net trained on digits in a few seconds, and its model file."""
    root = tmp_path_factory.mktemp("model")
    (root / "small_model.py").write_text(MODEL_FILE)
    namespace: dict = {}
    exec(compile(MODEL_FILE, "small_model", "exec"), namespace)
    splits = load_data("builtin:digits")
    model = namespace["make"]()
    train(model, splits.train, val_data=splits.val, epochs=6, lr=3e-3, progress=False, seed=0)
    weights = root / "small.pt"
    torch.save(model.state_dict(), weights)
    return model.eval(), splits, root / "small_model.py", weights


PLAN = {"fc1": ("svd", 3), "conv": ("weight", 3)}


def _factorized(model, splits, data_aware=False):
    cal = calibrate(model, splits.train, layers=list(PLAN)) if data_aware else None
    return rs.apply(model, rs.Plan.from_mapping(PLAN), calibration=cal, fit="activations" if data_aware else None)


def test_finetune_trains_only_the_factors_and_recovers(setup):
    model, splits, _, _ = setup
    small = _factorized(model, splits)
    before = copy.deepcopy(small.state_dict())
    result = ft.finetune(small, splits, 3, progress=False)
    assert small.state_dict().keys() == before.keys()
    for key, value in small.state_dict().items():  # the input model is not modified
        assert torch.equal(value, before[key])
    after = result.model.state_dict()
    for key in ("fc2.weight", "fc2.bias", "bn.weight", "bn.running_mean", "bn.running_var"):
        assert torch.equal(after[key], before[key]), key  # not a factor: untouched, BN statistics included
    assert not torch.equal(after["fc1.0.weight"], before["fc1.0.weight"])
    assert result.val_before == pytest.approx(accuracy(small, splits.val))
    assert result.val_after == pytest.approx(accuracy(result.model, splits.val))
    assert result.val_after > result.val_before  # real recovery from a rank-3 bottleneck
    assert result.trained == "factors" and result.trained_parameters == sum(
        p.numel() for p in ft.factor_parameters(result.model))
    assert result.test_after is not None and result.to_dict()["epochs_run"] == 3


def test_train_all_distillation_and_determinism(setup):
    model, splits, _, _ = setup
    small = _factorized(model, splits, data_aware=True)
    teacher_state = copy.deepcopy(model.state_dict())
    a = ft.finetune(small, splits, 2, teacher=model, train="all", progress=False, seed=3)
    b = ft.finetune(small, splits, 2, teacher=model, train="all", progress=False, seed=3)
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    assert a.distilled and a.trained_parameters == a.total_parameters
    assert not torch.equal(a.model.fc2.weight, small.fc2.weight)
    for key, value in model.state_dict().items():
        assert torch.equal(value, teacher_state[key])  # the teacher is never trained
    plain = ft.finetune(small, splits, 2, train="all", progress=False, seed=3)
    assert not torch.equal(plain.model.fc2.weight, a.model.fc2.weight)


def test_never_worse_on_validation_even_when_training_diverges(setup):
    model, splits, _, _ = setup
    small = _factorized(model, splits, data_aware=True)
    start = accuracy(small, splits.val)
    with pytest.warns(RuntimeWarning, match="diverged"):
        result = ft.finetune(small, splits, 2, lr=50.0, optimizer="sgd", progress=False)
    assert accuracy(result.model, splits.val) >= start


def test_top_level_verb_and_errors(setup):
    model, splits, _, _ = setup
    small = _factorized(model, splits)
    result = rs.finetune(small, splits, 1, progress=False)
    assert result.epochs_run == 1 and rs.finetune is ft.finetune
    with pytest.raises(ConfigError, match="no factorized layers"):
        ft.finetune(model, splits, 1, progress=False)
    with pytest.raises(ConfigError, match="train must be one of"):
        ft.finetune(small, splits, 1, train="bias", progress=False)
    with pytest.warns(UserWarning, match="without validation"):
        ft.finetune(small, splits.train, 1, progress=False)


# --------------------------------------------------------------------------- CLI

def _cli(setup, out, *extra):
    _, _, model_file, weights = setup
    plan = out.parent / "plan.json"
    rs.Plan.from_mapping(PLAN).save(plan)
    return main(["finetune", "--model", f"{model_file}:make", "--weights", str(weights), "--plan", str(plan),
                 "--data", "builtin:digits", "--out", str(out), "--no-progress", *extra])


def test_cli_finetune_writes_a_loadable_model_and_summary(setup, tmp_path, capsys):
    model, splits, model_file, _ = setup
    out = tmp_path / "out"
    assert _cli(setup, out, "--epochs", "2", "--distill", "--fit", "activations") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["accuracy"]) == {"original", "factorized", "finetuned"}
    assert summary["fit"] == "activations" and summary["finetune"]["distilled"]
    assert summary["accuracy"]["finetuned"]["val"] >= summary["accuracy"]["factorized"]["val"]
    loaded = rs.load(model, out)
    assert accuracy(loaded, splits.val) == pytest.approx(summary["accuracy"]["finetuned"]["val"])
    assert not (out / ".finetune-checkpoint").exists()
    assert "finetuned" in capsys.readouterr().out
    # A non-empty --out is refused without --force; --force replaces our files.
    assert _cli(setup, out, "--epochs", "1") == 1
    assert "not empty" in capsys.readouterr().err
    assert _cli(setup, out, "--epochs", "1", "--force") == 0
    # Fine-tuning again from the saved directory (plan read from it).
    again = tmp_path / "again"
    assert main(["finetune", "--model", f"{model_file}:make", "--weights", str(out), "--data", "builtin:digits",
                 "--out", str(again), "--epochs", "1", "--no-progress"]) == 0


def test_cli_resumes_an_interrupted_run(setup, tmp_path, monkeypatch):
    import rankshrink.train as train_module

    full = tmp_path / "full"
    assert _cli(setup, full, "--epochs", "2") == 0
    real_save = train_module._save_checkpoint
    calls = []

    def interrupt_after_first(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_save_checkpoint", interrupt_after_first)
    resumed = tmp_path / "resumed"
    assert _cli(setup, resumed, "--epochs", "2") == 130
    assert calls and [p.name for p in resumed.iterdir()] == [".finetune-checkpoint"]
    monkeypatch.setattr(train_module, "_save_checkpoint", real_save)
    assert _cli(setup, resumed, "--epochs", "2") == 0  # no --force needed to resume
    a = rs.files.load_tensors(full / "model.safetensors")
    b = rs.files.load_tensors(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- combined workflow

def test_compress_and_recover_meets_the_tolerance(setup, tmp_path):
    model, splits, _, _ = setup
    result = compress_and_recover(model, splits, tolerance=0.02, search_tolerance=0.06, epochs=2,
                                     search_options={"cache": tmp_path / "cache", "layers": ["fc1"]},
                                     progress=False)
    acc = result.accuracy
    assert result.meets_tolerance
    assert acc["original"]["val"] - acc["finetuned"]["val"] <= 0.02 + 1e-9
    assert acc["finetuned"]["val"] >= acc["factorized"]["val"]
    assert 0 < result.macs_ratio <= 1 and result.attempts[0]["search_tolerance"] == 0.06
    json.dumps(result.to_dict())
