"""The one training loop: built-in model training, recovery fine-tuning and LoRA training.

Design points shared by all three uses:

* Deterministic: shuffling uses a ``torch.Generator`` seeded with ``seed`` and the
  global RNG (dropout) is forked and seeded, so the same call gives bit-identical
  weights on the same machine, and the caller's global RNG is left untouched.
* ``parameters`` restricts what is trained; every other parameter gets
  ``requires_grad=False`` for the duration (restored afterwards) and is unchanged bit
  for bit. Normalisation layers with running statistics (BatchNorm, tracked
  InstanceNorm) follow their parameters: one whose affine parameters are all frozen is
  kept in eval mode so its running statistics stay as they were; one without affine
  parameters trains its statistics only when the whole model is trained.
* With validation (``val_data`` or ``metric``) the initial weights are scored as epoch
  0 and, with ``keep_best``, the best-scoring weights are returned, so the result is
  never worse on validation than the starting point. Ties keep the earlier epoch.
* A non-finite loss or non-finite weights stop training ("diverged"): the model gets
  back the best weights (with ``keep_best`` and validation) or the weights from before
  the failed epoch, and a warning says to lower the learning rate.
* ``checkpoint_dir`` makes runs resumable: after every epoch one file
  (``train_checkpoint.pt``, tensors and plain containers only, written atomically)
  holds model, optimizer, schedule step, RNG states, history and best weights. A rerun
  with the same arguments continues after the last finished epoch and ends with
  weights bit-identical to an uninterrupted run. The checkpoint stores a fingerprint
  of everything that shapes the run (hyper-parameters, seed, which parameters train,
  initial model and teacher weights, data); a checkpoint from another configuration
  raises ``ConfigError`` naming the differences rather than being resumed or
  overwritten. ``epochs`` is part of the fingerprint only for the cosine schedule
  (which depends on it); with ``schedule="constant"`` a finished run can be extended.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .data import _dataset_len, has_labels, iterate_batches
from .errors import ConfigError, DataError, FileFormatError
from .files import atomic_path
from .fingerprint import dataset_fingerprint, module_fingerprint
from .inputs import call_checked, output_tensor, to_model
from .metrics import _device_of, accuracy, check_logits, eval_mode
from .validation import check_bool, check_choice, check_int, check_number, check_optional_int

__all__ = ["TrainConfig", "TrainResult", "train", "distillation_loss", "representation_loss", "distill_kind",
           "CHECKPOINT_NAME", "DISTILL_LOSSES"]

CHECKPOINT_NAME = "train_checkpoint.pt"
_CHECKPOINT_FORMAT = "rankshrink-train-checkpoint"
_CHECKPOINT_VERSION = 2
_OPTIMIZERS = ("adam", "adamw", "sgd")
_SCHEDULES = ("cosine", "constant")
DISTILL_LOSSES = ("auto", "kl", "cosine", "mse", "tokens")
# The distillation losses on output representations (no labels needed): an encoder's hidden states.
REPRESENTATION_LOSSES = ("cosine", "mse", "tokens")
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train: schedule, optimizer, distillation and stopping (every field checked on creation).

    ``schedule``: 'cosine' (per step from ``lr`` towards 0 over all epochs) or 'constant'.
    ``optimizer``: 'adam', 'adamw' or 'sgd' (momentum 0.9). ``patience``: stop after that
    many epochs without a validation improvement. With a teacher the loss is
    ``(1 − distill_weight)·CE + distill_weight·T²·KL`` at ``T = distill_temperature``.
    ``distill_loss``: 'kl' (that loss, on logits), 'cosine' (``1 − cos`` of the student's and the
    teacher's output representations -- an encoder's mask-mean-pooled last hidden state, see
    :mod:`rankshrink.outputs`), 'mse' (their squared error over the teacher's energy), 'tokens' (an encoder's:
    the pooled cosine plus ``1 − cos`` of every real token's last hidden state) or 'auto'
    (cosine for an encoder's hidden states, kl for logits). The representation losses need no labels
    and replace the cross-entropy.
    ``keep_best``: return the best-validating weights (the starting ones count as epoch 0).
    """

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    patience: int | None = None
    distill_temperature: float = 2.0
    distill_weight: float = 0.5
    distill_loss: str = "auto"
    seed: int = 0
    keep_best: bool = True

    def __post_init__(self) -> None:
        check_int(self.epochs, "epochs", minimum=0)
        check_number(self.lr, "lr", minimum=0, low_open=True)
        check_int(self.batch_size, "batch_size", minimum=1)
        check_choice(self.optimizer, "optimizer", _OPTIMIZERS)
        check_number(self.weight_decay, "weight_decay", minimum=0)
        check_choice(self.schedule, "schedule", _SCHEDULES)
        check_optional_int(self.patience, "patience", minimum=1)
        check_number(self.distill_temperature, "distill_temperature", minimum=0, low_open=True)
        check_number(self.distill_weight, "distill_weight", minimum=0, maximum=1)
        check_choice(self.distill_loss, "distill_loss", DISTILL_LOSSES)
        check_int(self.seed, "seed", minimum=0)
        check_bool(self.keep_best, "keep_best")

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


@dataclass
class TrainResult:
    """What :func:`train` did. ``best_epoch`` 0 means the initial weights were best.

    ``epochs_run`` counts all finished epochs, including those a resumed checkpoint
    had already done; ``resumed_from_epoch`` is None for a fresh run.
    """

    model: nn.Module
    history: list[dict[str, Any]]
    initial_val: float | None
    best_val: float | None
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    resumed_from_epoch: int | None
    diverged: bool = False


@dataclass
class _RunState:
    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    initial_val: float | None = None
    best_val: float | None = None
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    diverged: bool = False


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor | None, *, temperature: float = 2.0,
                      weight: float = 0.5) -> torch.Tensor:
    """``(1 - weight) * CE(student, labels) + weight * T² * KL(teacher_T || student_T)``.

    ``KL`` is averaged over the batch; the ``T²`` factor keeps its gradients on the
    scale of the cross-entropy term (Hinton et al., 2015). Without labels the loss is the
    distillation term alone, ``T² * KL``.
    """
    if labels is not None:
        ce = F.cross_entropy(student_logits, labels)
        if weight == 0.0:
            return ce
    kl = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                  F.log_softmax(teacher_logits / temperature, dim=1),
                  reduction="batchmean", log_target=True)
    if labels is None:
        return (temperature ** 2) * kl
    return (1.0 - weight) * ce + weight * (temperature ** 2) * kl


def representation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Distillation without labels: ``mean(1 − cos(student, teacher))`` per sample ('cosine'), or
    ``Σ(student − teacher)² / Σ teacher²`` ('mse'); the tensors are (batch, ...) and flattened per sample."""
    s = student.reshape(student.shape[0], -1).float()
    t = teacher.reshape(teacher.shape[0], -1).float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()
    if kind == "mse":
        return (s - t).pow(2).sum() / t.pow(2).sum().clamp(min=1e-12)
    raise ConfigError(f"representation loss must be cosine or mse, got {kind!r}.")


def token_loss(student_output: Any, teacher_output: Any, inputs: Any) -> torch.Tensor:
    """``mean(1 − cos)`` of the student's and the teacher's last hidden states over every real token (the
    inputs' attention mask): a far denser signal than the pooled sentence embedding alone."""
    from .outputs import hidden_states

    student, teacher = hidden_states(student_output), hidden_states(teacher_output)
    per_token = 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-8)
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(per_token.shape):
        weights = mask.to(device=per_token.device, dtype=per_token.dtype)
        return (per_token * weights).sum() / weights.sum().clamp(min=1.0)
    return per_token.mean()


def distill_kind(config_kind: str, output: Any) -> str:
    """The distillation loss for a model output: ``config_kind``, or for 'auto' cosine on an encoder's hidden
    states (no logits to soften) and kl otherwise."""
    if config_kind != "auto":
        return config_kind
    from .outputs import output_kind

    try:
        return "cosine" if output_kind(output) == "hidden" else "kl"
    except DataError:
        return "kl"


# --------------------------------------------------------------------------- helpers

def _select_parameters(model: nn.Module, parameters: Iterable[nn.Parameter] | None) -> list[tuple[str, nn.Parameter]]:
    named = list(model.named_parameters())
    if parameters is None:
        chosen = [(name, p) for name, p in named if p.requires_grad]
        if not chosen:
            raise ConfigError("the model has no parameters with requires_grad=True; pass "
                              "parameters= to say what to train.")
        return chosen
    by_id = {id(p): name for name, p in named}
    chosen, seen = [], set()
    for index, p in enumerate(parameters):
        if not isinstance(p, torch.Tensor) or id(p) not in by_id:
            raise ConfigError(f"item {index} of parameters= is not a parameter of the model being "
                              "trained; pass tensors from model.parameters().")
        if id(p) not in seen:
            seen.add(id(p))
            chosen.append((by_id[id(p)], p))
    if not chosen:
        raise ConfigError("parameters= is empty; there is nothing to train.")
    return chosen


def _frozen_norm_layers(model: nn.Module, trained_ids: set[int]) -> list[nn.Module]:
    whole_model = all(id(p) in trained_ids for p in model.parameters())
    frozen: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, _NORM_TYPES) and getattr(module, "track_running_stats", False):
            own = list(module.parameters(recurse=False))
            if (own and not any(id(p) in trained_ids for p in own)) or (not own and not whole_model):
                frozen.append(module)
    return frozen


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _better(new: float | None, old: float | None) -> bool:
    if new is None or math.isnan(new):
        return False
    return old is None or math.isnan(old) or new > old


def _make_optimizer(kind: str, params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def _save_checkpoint(path: Path, config: dict[str, Any], model: nn.Module,
                     opt: torch.optim.Optimizer, gen: torch.Generator, state: _RunState,
                     cuda_devices: list[torch.device]) -> None:
    payload = {
        "format": _CHECKPOINT_FORMAT,
        "version": _CHECKPOINT_VERSION,
        "config": config,
        "epoch": state.epoch,
        "step": state.step,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "shuffle_rng": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(cuda_devices[0]) if cuda_devices else None,
        "history": state.history,
        "initial_val": state.initial_val,
        "best_val": state.best_val,
        "best_epoch": state.best_epoch,
        "best_state": state.best_state,
        "bad_epochs": state.bad_epochs,
        "stopped_early": state.stopped_early,
        "diverged": state.diverged,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    import pickle

    from .files import require_file

    require_file(path, "training checkpoint", hint="Delete it to start fresh.")
    try:
        with open(path, "rb") as handle:
            payload = torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False: never for a file found on disk
        raise FileFormatError(f"training checkpoint '{path}' holds objects other than tensors and plain data (a "
                              "rankshrink checkpoint never does), so it is not loaded; delete it to start "
                              "fresh.") from None
    except Exception as exc:  # any unreadable checkpoint is a file problem for the user
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise FileFormatError(f"training checkpoint '{path}' is unreadable ({type(exc).__name__}: "
                              f"{first}); delete it to start fresh.") from None
    if not isinstance(payload, dict) or payload.get("format") != _CHECKPOINT_FORMAT:
        raise FileFormatError(f"'{path}' is not a rankshrink training checkpoint; delete it or "
                              "choose another checkpoint_dir.")
    if payload.get("version") != _CHECKPOINT_VERSION:
        raise FileFormatError(f"training checkpoint '{path}' has version {payload.get('version')}; "
                              f"this rankshrink writes version {_CHECKPOINT_VERSION}. Delete it to start fresh.")
    saved = payload.get("config", {})
    differences = [key for key in sorted(set(saved) | set(config)) if saved.get(key) != config.get(key)]
    if differences:
        details = "; ".join(f"{key}: {saved.get(key)!r} in the checkpoint, {config.get(key)!r} now"
                            for key in differences)
        hint = (" The cosine schedule depends on epochs; use schedule='constant' to extend a run."
                if "epochs" in differences else "")
        raise ConfigError(
            f"training checkpoint '{path}' was made by a different configuration ({details}).{hint} "
            "Delete it or choose another checkpoint_dir to start fresh."
        )
    return payload


# --------------------------------------------------------------------------- the loop

def train(model: nn.Module, train_data: Dataset, *, val_data: Dataset | None = None,
          config: TrainConfig | None = None, parameters: Iterable[nn.Parameter] | None = None,
          teacher: nn.Module | None = None, metric: Callable[[nn.Module], float] | None = None,
          checkpoint_dir: str | Path | None = None, progress: bool = True, **options: Any) -> TrainResult:
    """Train ``model`` in place on (inputs, labels) ``train_data`` with cross-entropy.

    ``config`` (a :class:`TrainConfig`) says how; its fields can also be passed as keywords
    (``train(model, data, epochs=3, lr=1e-3)``), which override ``config``'s.
    ``metric(model) -> float`` (higher is better, called in eval mode) defaults to
    accuracy on ``val_data``. ``teacher`` adds distillation (see :func:`distillation_loss`).
    ``parameters`` restricts what trains. The returned model (the same object) is in eval
    mode. See the module docstring for frozen parameters, BatchNorm, divergence and checkpoints.
    """
    unknown = sorted(set(options) - set(TrainConfig.field_names()))
    if unknown:
        raise ConfigError(f"unknown training option(s) {', '.join(map(repr, unknown))}; the options are "
                          f"{', '.join(TrainConfig.field_names())}.")
    config = (config or TrainConfig()).replace(**options)
    n = _dataset_len(train_data)
    if n == 0:
        raise DataError("the training data set is empty.")
    if val_data is not None and _dataset_len(val_data) == 0:
        raise DataError("the validation data set is empty; pass val_data=None to train without one.")
    if not has_labels(train_data) and teacher is None:
        raise ConfigError("the training data has no labels, so training needs a teacher to distil from (the original "
                          "model: teacher=, CLI --distill); or give the data labels.")
    evaluate = metric
    if evaluate is None and val_data is not None:
        evaluate = _default_metric(val_data, teacher)
    if config.patience is not None and evaluate is None:
        raise ConfigError("patience needs validation: pass val_data or metric.")

    trained = _select_parameters(model, parameters)
    trained_ids = {id(p) for _, p in trained}
    frozen_norms = _frozen_norm_layers(model, trained_ids)
    device = _device_of(model)
    single_batch_risk = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m not in frozen_norms
                            for m in model.modules())
    steps_per_epoch = math.ceil(n / config.batch_size) - (
        1 if single_batch_risk and n % config.batch_size == 1 and n > 1 else 0)
    total_steps = steps_per_epoch * config.epochs

    def lr_at(step: int) -> float:
        if config.schedule == "constant" or total_steps == 0:
            return float(config.lr)
        return float(config.lr) * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))

    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    identity: dict[str, Any] = {}
    if checkpoint_path is not None:
        identity = _run_identity(config, model, trained, teacher, train_data, val_data, metric)

    saved_requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    cuda_devices = [device] if device.type == "cuda" else []
    state = _RunState()
    resumed_from: int | None = None
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in trained_ids)
        opt = _make_optimizer(config.optimizer, [p for _, p in trained], float(config.lr), float(config.weight_decay))
        gen = torch.Generator().manual_seed(config.seed)
        epoch = _Epoch(model, train_data, opt, gen, lr_at, frozen_norms, single_batch_risk, device, teacher,
                       config, evaluate)
        with torch.random.fork_rng(devices=cuda_devices), eval_mode(*([teacher] if teacher is not None else [])):
            # Seed only the generators fork_rng restores, so the caller's RNGs stay untouched.
            torch.default_generator.manual_seed(config.seed)
            for cuda_device in cuda_devices:
                with torch.cuda.device(cuda_device):
                    torch.cuda.manual_seed(config.seed)
            if checkpoint_path is not None and checkpoint_path.exists():
                payload = _load_checkpoint(checkpoint_path, identity)
                model.load_state_dict(payload["model"])
                opt.load_state_dict(payload["optimizer"])
                gen.set_state(payload["shuffle_rng"])
                torch.set_rng_state(payload["torch_rng"])
                if cuda_devices and payload.get("cuda_rng") is not None:
                    torch.cuda.set_rng_state(payload["cuda_rng"], cuda_devices[0])
                state = _RunState(**{key: payload[key] for key in _RunState.__dataclass_fields__})
                resumed_from = state.epoch
            elif evaluate is not None:
                with eval_mode(model):
                    state.initial_val = float(evaluate(model))
                state.best_val, state.best_epoch, state.best_state = state.initial_val, 0, _clone_state(model)

            bar = _progress_bar(progress, config.epochs, state.epoch)
            try:
                while state.epoch < config.epochs and not state.stopped_early:
                    epoch.run(state)
                    if checkpoint_path is not None:
                        _save_checkpoint(checkpoint_path, identity, model, opt, gen, state, cuda_devices)
                    if bar is not None:
                        last = state.history[-1]
                        postfix = {"loss": f"{last['train_loss']:.4f}"}
                        if last["val_metric"] is not None:
                            postfix["val"] = f"{last['val_metric']:.4f}"
                        bar.set_postfix(postfix)
                        bar.update(1)
            finally:
                if bar is not None:
                    bar.close()
        if config.keep_best and state.best_state is not None:
            model.load_state_dict(state.best_state)
    finally:
        for p, flag in saved_requires_grad:
            p.requires_grad_(flag)
        model.eval()
    return TrainResult(model=model, history=list(state.history), initial_val=state.initial_val,
                       best_val=state.best_val, best_epoch=state.best_epoch, epochs_run=state.epoch,
                       stopped_early=state.stopped_early, resumed_from_epoch=resumed_from,
                       diverged=state.diverged)


def _default_metric(val_data: Dataset, teacher: nn.Module | None) -> Callable[[nn.Module], float]:
    """Validation accuracy, or, for unlabelled data, agreement with the teacher's predictions (classifiers) or
    the mean cosine of the outputs' representations (encoders, see :mod:`rankshrink.outputs`)."""
    from .metrics import agreement, predictions

    if has_labels(val_data):
        return lambda m: accuracy(m, val_data, nonfinite="wrong")
    if teacher is None:
        raise ConfigError("the validation data has no labels: pass a teacher (agreement with it is then the metric) "
                          "or a metric=.")
    from .search.metrics import _auto_metric, as_metric

    if _auto_metric(teacher, val_data) == "cosine":
        return as_metric("cosine", teacher, val_data)
    reference: list[torch.Tensor] = []

    def agree(m: nn.Module) -> float:
        if not reference:
            reference.append(predictions(teacher, val_data))
        return agreement(m, val_data, reference[0], nonfinite="wrong")

    return agree


def _run_identity(config: TrainConfig, model: nn.Module, trained: list[tuple[str, nn.Parameter]],
                  teacher: nn.Module | None, train_data: Dataset, val_data: Dataset | None,
                  metric: Callable | None) -> dict[str, Any]:
    """Everything that shapes a run, by content: a checkpoint resumes only the very same run."""
    return {
        "optimizer": config.optimizer, "lr": float(config.lr), "batch_size": config.batch_size,
        "weight_decay": float(config.weight_decay), "schedule": config.schedule,
        "epochs": config.epochs if config.schedule == "cosine" else None, "seed": config.seed,
        "patience": config.patience,
        "trained_parameters": hashlib.sha256("\n".join(name for name, _ in trained).encode()).hexdigest(),
        "initial_model": module_fingerprint(model),
        "teacher": module_fingerprint(teacher) if teacher is not None else None,
        "distillation": ([float(config.distill_temperature), float(config.distill_weight)]
                         + ([config.distill_loss] if config.distill_loss != "auto" else [])
                         if teacher is not None else None),
        "train_data": dataset_fingerprint(train_data),
        "val_data": dataset_fingerprint(val_data) if val_data is not None else None,
        "metric": "custom" if metric is not None else ("accuracy" if val_data is not None else None),
    }


def _progress_bar(enabled: bool, epochs: int, start: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=epochs, initial=start, desc="train", unit="epoch", file=sys.stderr,
                leave=False, dynamic_ncols=True)


@dataclass
class _Epoch:
    """What one epoch of a run needs; :meth:`run` trains one epoch and validates it."""

    model: nn.Module
    train_data: Dataset
    opt: torch.optim.Optimizer
    gen: torch.Generator
    lr_at: Callable[[int], float]
    frozen_norms: list[nn.Module]
    single_batch_risk: bool
    device: torch.device
    teacher: nn.Module | None
    config: TrainConfig
    evaluate: Callable[[nn.Module], float] | None

    def run(self, state: _RunState) -> None:
        """One epoch plus its validation; updates ``state`` (epoch, history, best, stopping)."""
        model, opt, config = self.model, self.opt, self.config
        started = time.perf_counter()
        epoch = state.epoch + 1
        before = _clone_state(model)  # fallback if this epoch diverges
        epoch_lr = self.lr_at(state.step)
        model.train()
        for module in self.frozen_norms:
            module.eval()
        order = torch.randperm(_dataset_len(self.train_data), generator=self.gen)
        loss_sum, seen, diverged = 0.0, 0, False
        for inputs, labels in iterate_batches(self.train_data, config.batch_size, order=order,
                                              drop_last_single=self.single_batch_risk):
            inputs = to_model(inputs, model)
            labels = None if labels is None else labels.to(self.device)
            for group in opt.param_groups:
                group["lr"] = self.lr_at(state.step)
            output = call_checked(model, inputs, what="the training data")
            kind = distill_kind(config.distill_loss, output) if self.teacher is not None else "kl"
            if kind in REPRESENTATION_LOSSES:
                from .outputs import representation

                assert self.teacher is not None
                logits = representation(output, inputs)
                with torch.no_grad():
                    teacher_inputs = to_model(inputs, self.teacher)
                    teacher_output = call_checked(self.teacher, teacher_inputs, what="the training data (teacher)")
                    target = representation(teacher_output, teacher_inputs)
                if kind == "tokens":
                    loss = representation_loss(logits, target, "cosine") + token_loss(output, teacher_output, inputs)
                else:
                    loss = representation_loss(logits, target, kind)
            elif self.teacher is not None:
                logits = output_tensor(output)
                if labels is not None:
                    check_logits(logits, labels)
                with torch.no_grad():
                    teacher_logits = output_tensor(call_checked(self.teacher, to_model(inputs, self.teacher),
                                                                what="the training data (teacher)"))
                loss = distillation_loss(logits, teacher_logits, labels, temperature=config.distill_temperature,
                                         weight=config.distill_weight)
            else:
                assert labels is not None  # train() refuses unlabelled data without a teacher
                logits = output_tensor(output)
                check_logits(logits, labels)
                loss = F.cross_entropy(logits, labels)
            value = float(loss.detach())
            if not math.isfinite(value):
                diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state.step += 1
            loss_sum += value * logits.shape[0]
            seen += logits.shape[0]
        if not diverged:
            diverged = not all(bool(torch.isfinite(p).all()) for group in opt.param_groups
                               for p in group["params"])
        model.eval()

        val: float | None = None
        if diverged:
            warnings.warn(f"training diverged in epoch {epoch} (non-finite loss or weights at "
                          f"lr={epoch_lr:g}); stopping and restoring earlier weights. Lower the "
                          "learning rate.", RuntimeWarning, stacklevel=4)
            model.load_state_dict(before)
            state.diverged = state.stopped_early = True
        elif self.evaluate is not None:
            with eval_mode(model):
                val = float(self.evaluate(model))
            if _better(val, state.best_val):
                state.best_val, state.best_epoch, state.bad_epochs = val, epoch, 0
                state.best_state = _clone_state(model)
            else:
                state.bad_epochs += 1
                if config.patience is not None and state.bad_epochs >= config.patience:
                    state.stopped_early = True
        state.epoch = epoch
        state.history.append({
            "epoch": epoch,
            "train_loss": loss_sum / seen if seen and not diverged else math.nan,
            "val_metric": val,
            "lr": epoch_lr,
            "seconds": time.perf_counter() - started,
        })
