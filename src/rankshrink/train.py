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

import hashlib
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .data import _dataset_len, _tensor_source, iterate_batches
from .errors import ConfigError, DataError, FileFormatError
from .fileio import atomic_path
from .metrics import _device_of, accuracy, check_logits, eval_mode, to_model

__all__ = ["TrainResult", "train", "distillation_loss", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "train_checkpoint.pt"
_CHECKPOINT_FORMAT = "rankshrink-train-checkpoint"
_CHECKPOINT_VERSION = 1
_OPTIMIZERS = ("adam", "adamw", "sgd")
_SCHEDULES = ("cosine", "constant")
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


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
                      labels: torch.Tensor, *, temperature: float = 2.0,
                      weight: float = 0.5) -> torch.Tensor:
    """``(1 - weight) * CE(student, labels) + weight * T² * KL(teacher_T || student_T)``.

    ``KL`` is averaged over the batch; the ``T²`` factor keeps its gradients on the
    scale of the cross-entropy term (Hinton et al., 2015).
    """
    ce = F.cross_entropy(student_logits, labels)
    if weight == 0.0:
        return ce
    kl = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                  F.log_softmax(teacher_logits / temperature, dim=1),
                  reduction="batchmean", log_target=True)
    return (1.0 - weight) * ce + weight * (temperature ** 2) * kl


# --------------------------------------------------------------------------- helpers

def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _module_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _data_digest(dataset: Dataset) -> str:
    source = _tensor_source(dataset)
    digest = hashlib.sha256(f"{type(dataset).__name__}|{_dataset_len(dataset)}|".encode())
    if source is not None:
        tensors, index_map = source
        for tensor in tensors + ((index_map,) if index_map is not None else ()):
            digest.update(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


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
    frozen = []
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


def _validate(epochs: int, lr: float, batch_size: int, optimizer: str, weight_decay: float,
              schedule: str, distill_temperature: float, distill_weight: float,
              patience: int | None) -> None:
    if not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"epochs must be a non-negative integer, got {epochs!r}.")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr must be a positive number, got {lr!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if optimizer not in _OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {', '.join(_OPTIMIZERS)}; got {optimizer!r}.")
    if schedule not in _SCHEDULES:
        raise ConfigError(f"schedule must be one of {', '.join(_SCHEDULES)}; got {schedule!r}.")
    if not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay!r}.")
    if not distill_temperature > 0:
        raise ConfigError(f"distill_temperature must be > 0, got {distill_temperature!r}.")
    if not 0.0 <= distill_weight <= 1.0:
        raise ConfigError(f"distill_weight must be in [0, 1], got {distill_weight!r}.")
    if patience is not None and (not isinstance(patience, int) or patience < 1):
        raise ConfigError(f"patience must be a positive integer or None, got {patience!r}.")


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
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable checkpoint is a file problem for the user
        raise FileFormatError(f"training checkpoint '{path}' is unreadable ({type(exc).__name__}: "
                              f"{exc}); delete it to start fresh.") from None
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
          epochs: int = 10, lr: float = 1e-3, batch_size: int = 64, optimizer: str = "adam",
          weight_decay: float = 0.0, schedule: str = "cosine",
          parameters: Iterable[nn.Parameter] | None = None,
          teacher: nn.Module | None = None, distill_temperature: float = 2.0,
          distill_weight: float = 0.5, patience: int | None = None,
          metric: Callable[[nn.Module], float] | None = None, seed: int = 0,
          checkpoint_dir: str | Path | None = None, progress: bool = True,
          keep_best: bool = True) -> TrainResult:
    """Train ``model`` in place on (inputs, labels) ``train_data`` with cross-entropy.

    ``metric(model) -> float`` (higher is better, called in eval mode) defaults to
    accuracy on ``val_data``. ``teacher`` adds distillation (see
    :func:`distillation_loss`). ``patience`` stops after that many epochs without a
    validation improvement. The cosine schedule anneals per step from ``lr`` towards 0
    over all epochs; SGD uses momentum 0.9. The returned model (the same object) is in
    eval mode. See the module docstring for frozen parameters, BatchNorm, divergence
    and checkpoints.
    """
    _validate(epochs, lr, batch_size, optimizer, weight_decay, schedule, distill_temperature,
              distill_weight, patience)
    n = _dataset_len(train_data)
    if n == 0:
        raise DataError("the training data set is empty.")
    if val_data is not None and _dataset_len(val_data) == 0:
        raise DataError("the validation data set is empty; pass val_data=None to train without one.")
    evaluate = metric
    if evaluate is None and val_data is not None:
        def evaluate(m: nn.Module) -> float:
            return accuracy(m, val_data, nonfinite="wrong")
    if patience is not None and evaluate is None:
        raise ConfigError("patience needs validation: pass val_data or metric.")

    trained = _select_parameters(model, parameters)
    trained_ids = {id(p) for _, p in trained}
    frozen_norms = _frozen_norm_layers(model, trained_ids)
    device = _device_of(model)
    single_batch_risk = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m not in frozen_norms
                            for m in model.modules())
    steps_per_epoch = math.ceil(n / batch_size) - (1 if single_batch_risk and n % batch_size == 1 and n > 1 else 0)
    total_steps = steps_per_epoch * epochs

    def lr_at(step: int) -> float:
        if schedule == "constant" or total_steps == 0:
            return float(lr)
        return float(lr) * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))

    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    config: dict[str, Any] = {}
    if checkpoint_path is not None:
        config = {
            "optimizer": optimizer, "lr": float(lr), "batch_size": batch_size,
            "weight_decay": float(weight_decay), "schedule": schedule,
            "epochs": epochs if schedule == "cosine" else None, "seed": seed, "patience": patience,
            "trained_parameters": hashlib.sha256("\n".join(name for name, _ in trained).encode()).hexdigest(),
            "initial_model": _module_digest(model),
            "teacher": _module_digest(teacher) if teacher is not None else None,
            "distillation": [float(distill_temperature), float(distill_weight)] if teacher is not None else None,
            "train_data": _data_digest(train_data),
            "val_data": _data_digest(val_data) if val_data is not None else None,
            "metric": "custom" if metric is not None else ("accuracy" if val_data is not None else None),
        }

    saved_requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    cuda_devices = [device] if device.type == "cuda" else []
    state = _RunState()
    resumed_from: int | None = None
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in trained_ids)
        opt = _make_optimizer(optimizer, [p for _, p in trained], float(lr), float(weight_decay))
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=cuda_devices), eval_mode(*([teacher] if teacher is not None else [])):
            # Seed only the generators fork_rng restores, so the caller's RNGs stay untouched.
            torch.default_generator.manual_seed(seed)
            for cuda_device in cuda_devices:
                with torch.cuda.device(cuda_device):
                    torch.cuda.manual_seed(seed)
            if checkpoint_path is not None and checkpoint_path.exists():
                payload = _load_checkpoint(checkpoint_path, config)
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

            bar = _progress_bar(progress, epochs, state.epoch)
            try:
                while state.epoch < epochs and not state.stopped_early:
                    _run_epoch(model, train_data, opt, gen, state, lr_at, batch_size, frozen_norms,
                               single_batch_risk, device, teacher, distill_temperature,
                               distill_weight, evaluate, patience)
                    if checkpoint_path is not None:
                        _save_checkpoint(checkpoint_path, config, model, opt, gen, state, cuda_devices)
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
        if keep_best and state.best_state is not None:
            model.load_state_dict(state.best_state)
    finally:
        for p, flag in saved_requires_grad:
            p.requires_grad_(flag)
        model.eval()
    return TrainResult(model=model, history=list(state.history), initial_val=state.initial_val,
                       best_val=state.best_val, best_epoch=state.best_epoch, epochs_run=state.epoch,
                       stopped_early=state.stopped_early, resumed_from_epoch=resumed_from,
                       diverged=state.diverged)


def _progress_bar(enabled: bool, epochs: int, start: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=epochs, initial=start, desc="train", unit="epoch", file=sys.stderr,
                leave=False, dynamic_ncols=True)


def _run_epoch(model: nn.Module, train_data: Dataset, opt: torch.optim.Optimizer,
               gen: torch.Generator, state: _RunState, lr_at: Callable[[int], float],
               batch_size: int, frozen_norms: list[nn.Module], single_batch_risk: bool,
               device: torch.device, teacher: nn.Module | None, temperature: float,
               distill_weight: float, evaluate: Callable[[nn.Module], float] | None,
               patience: int | None) -> None:
    """One epoch plus its validation; updates ``state`` (epoch, history, best, stopping)."""
    started = time.perf_counter()
    epoch = state.epoch + 1
    before = _clone_state(model)  # fallback if this epoch diverges
    epoch_lr = lr_at(state.step)
    model.train()
    for module in frozen_norms:
        module.eval()
    order = torch.randperm(_dataset_len(train_data), generator=gen)
    loss_sum, seen, diverged = 0.0, 0, False
    for inputs, labels in iterate_batches(train_data, batch_size, order=order,
                                          drop_last_single=single_batch_risk):
        inputs, labels = to_model(inputs, model), labels.to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(state.step)
        logits = model(inputs)
        if not isinstance(logits, torch.Tensor):
            raise DataError(f"the model returned {type(logits).__name__}, not a tensor of logits.")
        check_logits(logits, labels)
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(inputs)
            loss = distillation_loss(logits, teacher_logits, labels, temperature=temperature,
                                     weight=distill_weight)
        else:
            loss = F.cross_entropy(logits, labels)
        value = float(loss.detach())
        if not math.isfinite(value):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state.step += 1
        loss_sum += value * labels.shape[0]
        seen += labels.shape[0]
    if not diverged:
        diverged = not all(bool(torch.isfinite(p).all()) for group in opt.param_groups
                           for p in group["params"])
    model.eval()

    val: float | None = None
    if diverged:
        warnings.warn(f"training diverged in epoch {epoch} (non-finite loss or weights at "
                      f"lr={epoch_lr:g}); stopping and restoring earlier weights. Lower the "
                      "learning rate.", RuntimeWarning, stacklevel=3)
        model.load_state_dict(before)
        state.diverged = state.stopped_early = True
    elif evaluate is not None:
        with eval_mode(model):
            val = float(evaluate(model))
        if _better(val, state.best_val):
            state.best_val, state.best_epoch, state.bad_epochs = val, epoch, 0
            state.best_state = _clone_state(model)
        else:
            state.bad_epochs += 1
            if patience is not None and state.bad_epochs >= patience:
                state.stopped_early = True
    state.epoch = epoch
    state.history.append({
        "epoch": epoch,
        "train_loss": loss_sum / seen if seen and not diverged else math.nan,
        "val_metric": val,
        "lr": epoch_lr,
        "seconds": time.perf_counter() - started,
    })
