"""The training loop (determinism, resume, keep-best, distillation, frozen parameters) and metrics."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset, TensorDataset

from rankshrink.data import Splits, load_digits_splits
from rankshrink.errors import ConfigError, DataError
from rankshrink.metrics import accuracy, agreement, eval_mode, per_class_accuracy, predictions
from rankshrink.models import MnistMLP
from rankshrink.train import CHECKPOINT_NAME, distillation_loss, train


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_digits_splits()


def small_mlp(seed: int = 0, hidden: int = 32) -> MnistMLP:
    torch.manual_seed(seed)
    return MnistMLP(num_features=64, num_hidden_1=hidden, num_hidden_2=hidden)


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def pretrained(digits: Splits) -> MnistMLP:
    model = small_mlp()
    train(model, digits.train, epochs=3, lr=5e-3, progress=False)
    return model


# --------------------------------------------------------------------------- learning and determinism

def test_loss_decreases_and_accuracy(digits: Splits) -> None:
    model = small_mlp(hidden=64)
    result = train(model, digits.train, val_data=digits.val, epochs=6, lr=1e-2, progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0] * 0.5
    assert accuracy(model, digits.test) >= 0.9
    assert result.model is model and not model.training
    assert result.epochs_run == 6 and result.resumed_from_epoch is None and not result.stopped_early
    assert set(result.history[0]) >= {"epoch", "train_loss", "val_metric", "lr", "seconds"}
    assert result.initial_val is not None and result.best_val >= result.initial_val
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] == 1e-2 and all(a > b for a, b in zip(lrs, lrs[1:]))  # cosine decays


def test_same_seed_gives_identical_weights(digits: Splits) -> None:
    a, b, c = small_mlp(), small_mlp(), small_mlp()
    kwargs = dict(val_data=digits.val, epochs=2, lr=3e-3, progress=False)
    train(a, digits.train, seed=7, **kwargs)
    train(b, digits.train, seed=7, **kwargs)
    train(c, digits.train, seed=8, **kwargs)
    assert states_equal(a, b)
    assert not states_equal(a, c)


def test_global_rng_untouched(digits: Splits) -> None:
    model = small_mlp()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(model, digits.val, epochs=1, progress=False)
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------- checkpoints and resume

def test_resume_extends_a_constant_schedule_run_bit_for_bit(digits: Splits, tmp_path: Path) -> None:
    kwargs = dict(val_data=digits.val, lr=3e-3, schedule="constant", progress=False, seed=1)
    reference = small_mlp()
    ref = train(reference, digits.train, epochs=5, **kwargs)

    first = train(small_mlp(), digits.train, epochs=3, checkpoint_dir=tmp_path, **kwargs)
    assert first.epochs_run == 3 and (tmp_path / CHECKPOINT_NAME).is_file()
    raw = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)  # tensors and containers only
    assert raw["epoch"] == 3

    resumed_model = small_mlp()
    resumed = train(resumed_model, digits.train, epochs=5, checkpoint_dir=tmp_path, **kwargs)
    assert resumed.resumed_from_epoch == 3 and resumed.epochs_run == 5
    assert states_equal(resumed_model, reference)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in ref.history]
    assert ((resumed.best_epoch, resumed.best_val, resumed.initial_val)
            == (ref.best_epoch, ref.best_val, ref.initial_val))

    # a rerun of a finished run does no work and returns the same weights
    again_model = small_mlp()
    again = train(again_model, digits.train, epochs=5, checkpoint_dir=tmp_path, **kwargs)
    assert again.resumed_from_epoch == 5 and states_equal(again_model, reference)


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_with_cosine_schedule(digits: Splits, tmp_path: Path) -> None:
    calls = {"n": 0, "fail_at": None}

    def metric(model: nn.Module) -> float:
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise _Interrupt  # simulate a kill during epoch 3's validation
        return accuracy(model, digits.val)

    kwargs = dict(epochs=4, lr=3e-3, metric=metric, progress=False, seed=2)
    reference = small_mlp()
    train(reference, digits.train, **kwargs)

    calls.update(n=0, fail_at=4)  # call 1 scores the initial weights, calls 2-3 epochs 1-2
    with pytest.raises(_Interrupt):
        train(small_mlp(), digits.train, checkpoint_dir=tmp_path, **kwargs)
    calls.update(n=0, fail_at=None)
    model = small_mlp()
    result = train(model, digits.train, checkpoint_dir=tmp_path, **kwargs)
    assert result.resumed_from_epoch == 2
    assert states_equal(model, reference)


def test_checkpoint_from_other_configuration_is_refused(digits: Splits, tmp_path: Path) -> None:
    train(small_mlp(), digits.val, epochs=1, lr=1e-3, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"different configuration \(lr: 0\.001 in the checkpoint, 0\.002 now"):
        train(small_mlp(), digits.val, epochs=1, lr=2e-3, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="epochs.*schedule='constant'"):
        train(small_mlp(), digits.val, epochs=2, lr=1e-3, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="initial_model"):
        train(small_mlp(seed=5), digits.val, epochs=1, lr=1e-3, checkpoint_dir=tmp_path, progress=False)


# --------------------------------------------------------------------------- keep best, divergence, early stop

def test_keep_best_never_returns_worse_weights(digits: Splits, pretrained: MnistMLP) -> None:
    model = copy.deepcopy(pretrained)
    start = accuracy(model, digits.val)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = train(model, digits.train, val_data=digits.val, epochs=3, lr=1e4,
                       optimizer="sgd", progress=False)
    assert result.initial_val == start
    assert result.best_epoch == 0 and result.best_val == start
    assert accuracy(model, digits.val) == start
    assert states_equal(model, pretrained)


def test_divergence_stops_and_restores_finite_weights(digits: Splits, pretrained: MnistMLP) -> None:
    model = copy.deepcopy(pretrained)
    with pytest.warns(RuntimeWarning, match="diverged"):
        result = train(model, digits.train, epochs=4, lr=1e12, optimizer="sgd", progress=False)
    assert result.diverged and result.stopped_early and result.epochs_run < 4
    assert math.isnan(result.history[-1]["train_loss"])
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_patience_stops_early(digits: Splits) -> None:
    result = train(small_mlp(), digits.val, epochs=5, metric=lambda m: 0.5, patience=2, progress=False)
    assert result.stopped_early and result.epochs_run == 2 and result.best_epoch == 0
    with pytest.raises(ConfigError, match="patience"):
        train(small_mlp(), digits.val, epochs=1, patience=1, progress=False)


# --------------------------------------------------------------------------- distillation

def test_distillation_loss_matches_hand_computation() -> None:
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([1, 2])
    T, w = 2.0, 0.3

    def softmax(row: list[float]) -> list[float]:
        exps = [math.exp(v / T) for v in row]
        return [e / sum(exps) for e in exps]

    kl = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p_t, p_s = softmax(t_row), softmax(s_row)
        kl += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    kl /= 2
    ce = 0.0
    for row, label in zip(student.tolist(), labels.tolist()):
        ce -= math.log(math.exp(row[label]) / sum(math.exp(v) for v in row))
    ce /= 2
    expected = (1 - w) * ce + w * T * T * kl
    value = distillation_loss(student, teacher, labels, temperature=T, weight=w)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert distillation_loss(student, teacher, labels, weight=0.0).item() == pytest.approx(ce, rel=1e-6)


def test_distillation_pulls_student_towards_teacher(digits: Splits, pretrained: MnistMLP) -> None:
    teacher = copy.deepcopy(pretrained)
    subset = Subset(digits.train, list(range(200)))
    inputs = digits.train.tensors[0][:200]

    def kl_to_teacher(model: nn.Module) -> float:
        with torch.no_grad():
            return F.kl_div(F.log_softmax(model(inputs) / 2, 1), F.log_softmax(teacher(inputs) / 2, 1),
                            reduction="batchmean", log_target=True).item()

    plain, distilled = small_mlp(seed=3), small_mlp(seed=3)
    train(plain, subset, epochs=8, lr=3e-3, progress=False)
    teacher_mode = teacher.training
    train(distilled, subset, epochs=8, lr=3e-3, teacher=teacher, distill_weight=1.0, progress=False)
    assert teacher.training == teacher_mode
    assert kl_to_teacher(distilled) < kl_to_teacher(plain)
    assert states_equal(teacher, pretrained)  # the teacher is never trained


# --------------------------------------------------------------------------- frozen parameters, BatchNorm

def test_parameters_restricts_training(digits: Splits) -> None:
    model = small_mlp()
    before = copy.deepcopy(model)
    last = model.layers[4]
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    train(model, digits.train, epochs=2, parameters=last.parameters(), weight_decay=0.1,
          optimizer="adamw", progress=False)
    after = dict(model.named_parameters())
    for name, p in before.named_parameters():
        if name.startswith("layers.4."):
            assert not torch.equal(p, after[name]), name
        else:
            assert torch.equal(p, after[name]), name
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags

    other = small_mlp()
    with pytest.raises(ConfigError, match="not a parameter of the model"):
        train(model, digits.train, epochs=1, parameters=other.parameters(), progress=False)


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_batchnorm_statistics_follow_their_parameters(digits: Splits) -> None:
    torch.manual_seed(0)
    model = _BNNet()
    bn = model.body[2]
    mean = bn.running_mean.clone()
    train(model, digits.train, epochs=1, parameters=model.head.parameters(), progress=False)
    assert torch.equal(bn.running_mean, mean)  # frozen BN kept in eval mode
    assert not model.training
    # 1437 % 64 == 29, so no single-sample batch; check an odd size that would leave one
    odd = Subset(digits.train, list(range(65)))
    train(model, odd, epochs=1, batch_size=64, progress=False)
    assert not torch.equal(bn.running_mean, mean)  # trained BN updates its statistics


# --------------------------------------------------------------------------- validation and progress

def test_training_argument_and_data_errors(digits: Splits) -> None:
    empty = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="empty"):
        train(small_mlp(), empty, epochs=1, progress=False)
    for bad in (dict(optimizer="rmsprop"), dict(schedule="step"), dict(lr=-1.0), dict(epochs=-1),
                dict(batch_size=0), dict(distill_weight=2.0)):
        with pytest.raises(ConfigError):
            train(small_mlp(), digits.val, progress=False, **bad)
    narrow = MnistMLP(num_features=64, num_hidden_1=8, num_hidden_2=8, num_classes=5)
    with pytest.raises(DataError, match=r"outputs 5 classes .*\(64, 5\).*label 9"):
        train(narrow, digits.train, epochs=1, progress=False)


def test_progress_bar_goes_to_stderr(digits: Splits, capsys: pytest.CaptureFixture) -> None:
    train(small_mlp(), digits.val, epochs=1, progress=True)
    captured = capsys.readouterr()
    assert "train" in captured.err and captured.out == ""
    train(small_mlp(), digits.val, epochs=1, progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


# --------------------------------------------------------------------------- metrics

class _Const(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: x.shape[0]]


def test_metrics_values_and_mode_restoring(digits: Splits, pretrained: MnistMLP) -> None:
    model = copy.deepcopy(pretrained)
    model.train()
    model.layers[0].eval()  # mixed modes must come back exactly
    preds = predictions(model, digits.val, batch_size=37)
    assert model.training and not model.layers[0].training
    labels = digits.val.tensors[1]
    assert accuracy(model, digits.val) == pytest.approx(float((preds == labels).float().mean()))
    per_class = per_class_accuracy(model, digits.val)
    assert len(per_class) == 10 and all(0 <= v <= 1 for v in per_class)
    assert agreement(model, digits.val, preds) == 1.0
    assert agreement(model, digits.val, (preds + 1) % 10) == 0.0
    with pytest.raises(DataError, match="reference predictions"):
        agreement(model, digits.val, preds[:5])
    with eval_mode(model):
        assert not model.training
    assert model.training


def test_metrics_validation() -> None:
    x = torch.zeros(4, 2)
    y = torch.tensor([0, 1, 2, 1])
    with pytest.raises(DataError, match="empty"):
        accuracy(_Const(torch.zeros(4, 3)), TensorDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(DataError, match=r"outputs 2 classes \(output shape \(4, 2\)\).*label 2"):
        accuracy(_Const(torch.zeros(4, 2)), TensorDataset(x, y))
    with pytest.raises(DataError, match=r"shape \(4,\)"):
        accuracy(_Const(torch.zeros(4)), TensorDataset(x, y))
    nan = torch.tensor([[1.0, 0.0, 0.0], [float("nan"), 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    with pytest.raises(DataError, match="NaN"):
        accuracy(_Const(nan), TensorDataset(x, y))
    assert accuracy(_Const(nan), TensorDataset(x, y), nonfinite="wrong") == 0.75
    classes = per_class_accuracy(_Const(nan), TensorDataset(x, y), num_classes=4, nonfinite="wrong")
    assert classes[:3] == [1.0, 0.5, 1.0] and math.isnan(classes[3])
