"""Calibration: run a model on sample data and summarise each target layer's inputs.

``calibrate(model, dataset)`` registers forward pre-hooks on the target layers, runs
the model (eval mode, no gradients) on a calibration set in batches, and streams,
per layer, the count, mean and centred scatter of the layer's input vectors into an
:class:`~rankshrink.decompose.InputStats` in float64. Memory is O(d²) per layer
however many samples are used; only the current batch's patches are ever held
(and large batches are cut into chunks).

What is collected (the cheapest statistics that are exact for each method):

* ``Linear``: the input vectors themselves (``d = in_features``; extra leading
  dimensions, e.g. sequence positions, are flattened into more vectors).
* ``Conv1d``/``Conv2d`` — 'full' statistics: every im2col patch (``d = S·Πk``),
  extracted with ``torch.nn.functional.unfold`` using the layer's stride, dilation
  and padding; non-zero padding modes (reflect, replicate, circular) and 'same'
  padding are applied with ``F.pad`` first, exactly as the layer does. These serve
  'weight' and 'spatial' SVD (whose vertical-patch moment is derived from them) and
  also Tucker-2/CP (channel moment derived, plus exact re-fits of their later factors).
* Conv — 'channel' statistics: only the ``S × S`` moment of channel vectors at every
  patch position (``Πk`` times cheaper to keep); collected for layers planned with
  methods that need only channel statistics (Tucker-2, CP) when ``layers`` is a plan or a
  name → method mapping.

The result is a :class:`Calibration`; pass it to ``rankshrink.apply(model, plan,
calibration=cal)`` or ``factorize(module, method, rank, input_stats=cal[name])``.
Problems are reported before anything is returned: a layer the data never reaches,
inputs that do not fit the model, NaN/Inf activations (all :class:`DataError`), and
too few input vectors for a full-rank moment (a :class:`CalibrationWarning` naming the
layer and the counts).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from . import inputs as model_inputs
from .data import Splits, _dataset_len, calibration_subset, iterate_batches
from .decompose.stats import DIAGONAL, DiagonalStats, InputStats
from .errors import ConfigError, DataError, FileFormatError, LayerError, RankshrinkError
from .factorized import layer_type, linear_features, unsupported_reason
from .files import load_tensors, save_tensors
from .layers import aliases, factorizable_layers, get_layer
from .methods import get_method, method_names
from .metrics import eval_mode, to_model
from .plan import Plan
from .validation import check_int, check_optional_int

__all__ = ["Calibration", "CalibrationWarning", "calibrate", "DEFAULT_SAMPLES", "DEFAULT_BATCH_SIZE"]

DEFAULT_SAMPLES = 512
DEFAULT_BATCH_SIZE = 128
# Most float64 patch elements unfolded at once (32 MiB); larger batches are chunked.
_CHUNK_ELEMENTS = 1 << 22
_FORMAT = "rankshrink-calibration"
_VERSION = 1


class CalibrationWarning(UserWarning):
    """The calibration statistics of a layer are weak (too few input vectors)."""


class _HookError(Exception):
    def __init__(self, error: DataError):
        super().__init__(str(error))
        self.error = error


@dataclass
class Calibration:
    """Per-layer input statistics of one model on one calibration set.

    Index it by the layer's qualified name (any alias of a shared module works):
    ``cal["classifier.1"]`` is an :class:`~rankshrink.decompose.InputStats`.
    ``samples`` is the number of calibration samples run through the model.
    """

    stats: dict[str, Any]  # InputStats, or DiagonalStats for an embedding's lookup counts
    samples: int
    alias_of: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> InputStats:
        found = self.get(name)
        if found is None:
            listing = ", ".join(self.stats) or "none"
            raise DataError(f"the calibration has no statistics for layer '{name}' (calibrated layers: "
                            f"{listing}); recalibrate including it, or use fit='weights'.")
        return found

    def get(self, name: str) -> InputStats | None:
        if name in self.stats:
            return self.stats[name]
        canonical = self.alias_of.get(name)
        return self.stats.get(canonical) if canonical is not None else None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self):
        return iter(self.stats)

    def __len__(self) -> int:
        return len(self.stats)

    @property
    def layers(self) -> list[str]:
        return list(self.stats)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.stats.values())

    def summary(self) -> dict[str, dict[str, Any]]:
        """JSON-friendly per-layer description: kind, dimension, vectors, samples."""
        return {name: {"kind": s.kind, "dim": s.dim, "vectors": s.count, "samples": s.samples,
                       "kernel_size": list(s.kernel_size) if s.kernel_size else None}
                for name, s in self.stats.items()}

    def save(self, path: str | os.PathLike) -> None:
        """Write all statistics to one safetensors file (atomically)."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"samples": self.samples, "alias_of": self.alias_of, "layers": {}}
        for name, s in self.stats.items():
            for key, tensor in s.tensors().items():
                tensors[f"{name}::{key}"] = tensor.cpu()
            meta["layers"][name] = {"kind": s.kind, "dim": s.dim, "count": s.count, "samples": s.samples,
                                    "kernel_size": list(s.kernel_size) if s.kernel_size else None,
                                    "patch_count": s.patch_count}
        save_tensors(path, tensors, metadata={"format": _FORMAT, "version": str(_VERSION),
                                              "calibration": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        from safetensors import safe_open

        path = Path(path)
        tensors = load_tensors(path)
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            if metadata.get("format") != _FORMAT:
                raise FileFormatError(f"'{path}' is not a rankshrink calibration file.")
            if metadata.get("version") != str(_VERSION):
                raise FileFormatError(f"calibration file '{path}' has version {metadata.get('version')}; "
                                      f"this rankshrink reads version {_VERSION}.")
            meta = json.loads(metadata["calibration"])
            stats: dict[str, Any] = {}
            for name, info in meta["layers"].items():
                if info["kind"] == DIAGONAL:
                    stats[name] = DiagonalStats(int(info["dim"]), count=int(info["count"]),
                                                samples=int(info["samples"]), counts=tensors[f"{name}::counts"])
                    continue
                stats[name] = InputStats(info["kind"], int(info["dim"]), count=int(info["count"]),
                                         samples=int(info["samples"]), mean=tensors[f"{name}::mean"],
                                         scatter=tensors[f"{name}::scatter" if f"{name}::scatter" in tensors
                                                         else f"{name}::scatter_upper"],
                                         kernel_size=tuple(info["kernel_size"]) if info["kernel_size"] else None,
                                         patch_count=int(info["patch_count"]),
                                         patch_mean=tensors.get(f"{name}::patch_mean"))
            return cls(stats, int(meta["samples"]), dict(meta.get("alias_of", {})))
        except FileFormatError:
            raise
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
            raise FileFormatError(f"calibration file '{path}' is incomplete or corrupt ({type(exc).__name__}: "
                                  f"{exc}).") from None


# --------------------------------------------------------------------------- targets

def _resolve_targets(model: nn.Module, layers) -> tuple[dict[str, tuple[nn.Module, str]], bool]:
    """name -> (module, kind) and whether the names were given explicitly."""
    if layers is None:
        every = {name: (module, "full") for name, module in factorizable_layers(model)}
        if not every:
            raise LayerError(f"{type(model).__name__} has no factorizable layers (Linear, Conv1d, Conv2d) to "
                             "calibrate.")
        return every, False
    if isinstance(layers, Plan):
        items = [(name, entry.method) for name, entry in layers.items()]
    elif isinstance(layers, Mapping):
        items = []
        for name, value in layers.items():
            method = value if isinstance(value, str) else getattr(value, "method", None)
            if method is None and isinstance(value, (tuple, list)) and value:
                method = value[0]
            if method not in method_names():
                raise ConfigError(f"layers['{name}'] must name a method ({', '.join(method_names())}), got {value!r}.")
            items.append((name, method))
    elif isinstance(layers, str):
        items = [(layers, None)]
    else:
        try:
            items = [(name, None) for name in layers]
        except TypeError:
            raise ConfigError(f"layers must be None, a list of layer names, a name -> method mapping or a "
                              f"Plan; got {type(layers).__name__}.") from None
    if not items:
        raise ConfigError("layers is empty: name at least one layer to calibrate (or pass layers=None for all).")
    chosen: dict[str, tuple[nn.Module, str]] = {}
    by_module: dict[int, str] = {}
    for name, method in items:
        if not isinstance(name, str):
            raise ConfigError(f"layer names must be strings, got {name!r}.")
        module = get_layer(model, name)
        reason = unsupported_reason(module)
        if reason is not None:
            raise LayerError(f"layer '{name}' ({layer_type(module)}) cannot be calibrated for factorization: {reason}.")
        kind = ("full" if method is None or get_method(method).statistics == "full"
                or linear_features(module) is not None or isinstance(module, nn.Embedding) else "channel")
        if id(module) in by_module:  # a shared module: one set of statistics, the richer kind wins
            first = by_module[id(module)]
            if kind == "full":
                chosen[first] = (module, "full")
            continue
        by_module[id(module)] = name
        chosen[name] = (module, kind)
    return chosen, True


def _empty_stats(module: nn.Module, kind: str) -> InputStats | DiagonalStats:
    features = linear_features(module)
    if features is not None:
        return InputStats("full", features[0])
    if isinstance(module, nn.Embedding):
        return DiagonalStats(module.num_embeddings)
    assert isinstance(module, (nn.Conv1d, nn.Conv2d))  # _resolve_targets keeps only factorizable layers
    k = tuple(module.kernel_size)
    S = module.in_channels
    return InputStats(kind, S * math.prod(k) if kind == "full" else S, kernel_size=k)


# --------------------------------------------------------------------------- patches

def conv_patches(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """im2col patches (N·positions, S·Πk) exactly as ``module`` sees them (channel-major, like its weight)."""
    conv1d = isinstance(module, nn.Conv1d)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    pad = list(module._reversed_padding_repeated_twice)
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    if conv1d:
        x = x.unsqueeze(2)
        kernel, dilation, stride = (1, module.kernel_size[0]), (1, module.dilation[0]), (1, module.stride[0])
    else:
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    cols = F.unfold(x, kernel_size=kernel, dilation=dilation, stride=stride)  # (N, S·Πk, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _layer_rows(module: nn.Module, name: str, x: torch.Tensor,
               token_mask: torch.Tensor | None = None) -> tuple[int, Iterable[torch.Tensor]]:
    """(samples in this call, iterator of float64 row chunks) for one hooked input.

    ``token_mask`` (batch, positions), from the inputs' ``attention_mask``: a Linear input of shape
    (batch, positions, features) contributes only the rows of real tokens (padding never enters the
    statistics).
    """
    features = linear_features(module)
    if features is not None:
        in_features = features[0]
        if x.dim() == 0 or x.shape[-1] != in_features:
            raise DataError(f"the calibration data does not fit the model: layer '{name}' (Linear, expects inputs of "
                            f"shape (..., {in_features})) got {tuple(x.shape)}.")
        batch = x.shape[0] if x.dim() > 1 else 1
        if token_mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(token_mask.shape):
            rows = x[token_mask.to(x.device)]
        else:
            rows = x.reshape(-1, in_features)
        step = max(1, _CHUNK_ELEMENTS // max(1, in_features))
        return batch, (rows[i:i + step] for i in range(0, rows.shape[0], step))
    assert isinstance(module, (nn.Conv1d, nn.Conv2d))  # calibrated layers are Linear, Conv1d or Conv2d
    spatial_dims = 1 if isinstance(module, nn.Conv1d) else 2
    if x.dim() == spatial_dims + 1:
        x = x.unsqueeze(0)
    if x.dim() != spatial_dims + 2 or x.shape[1] != module.in_channels:
        axes = ", ".join(["…"] * spatial_dims)
        raise DataError(f"the calibration data does not fit the model: layer '{name}' ({layer_type(module)}, expects "
                        f"(batch, {module.in_channels}, {axes}) inputs) got {tuple(x.shape)}.")
    per_sample = module.in_channels * math.prod(module.kernel_size) * math.prod(x.shape[2:])
    step = max(1, _CHUNK_ELEMENTS // max(1, per_sample))
    return x.shape[0], (conv_patches(module, x[i:i + step]) for i in range(0, x.shape[0], step))


def _rows_read(module: nn.Module) -> tuple:
    """What decides the rows :func:`_layer_rows` reads from an input: two layers with equal keys read equal rows."""
    features = linear_features(module)
    if features is not None:
        return ("linear", features[0])
    assert isinstance(module, (nn.Conv1d, nn.Conv2d))  # calibrated layers are Linear, Conv1d or Conv2d
    return (type(module).__name__, module.in_channels, tuple(module.kernel_size), tuple(module.stride),
            module.padding if isinstance(module.padding, str) else tuple(module.padding), tuple(module.dilation),
            module.padding_mode)


# --------------------------------------------------------------------------- calibrate

def _as_dataset(dataset) -> Dataset:
    from .data import as_dataset, load_data

    if isinstance(dataset, str):
        dataset = load_data(dataset)
    if isinstance(dataset, Splits):
        return dataset.train

    try:
        return as_dataset(dataset, "calibration data")
    except DataError as exc:
        raise DataError(f"calibration data must be a data set, a Splits or inputs (a tensor, tuple or dict of "
                        f"tensors): {exc}") from None


def calibrate(model: nn.Module, dataset, layers=None, samples: int | None = DEFAULT_SAMPLES,
              batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False, *, seed: int = 0) -> Calibration:
    """Collect per-layer input statistics of ``model`` on ``dataset`` (see the module notes).

    ``dataset``: a map-style data set (items ``(inputs, label)`` or inputs alone), a
    :class:`~rankshrink.data.Splits` (its training split is used) or inputs (a tensor, a tuple
    or a dict of tensors, one row per sample). ``layers``: None (every
    factorizable layer, full statistics), a list of names, a name → method mapping or a
    :class:`Plan` (then layers whose method needs only channel statistics get just those).
    ``samples``: how many samples to use — a deterministic random subset for ``seed`` —
    or None for all. The model is run in eval mode and left unchanged.
    """
    check_optional_int(samples, "samples", minimum=1)
    check_int(batch_size, "batch_size", minimum=1)
    data = _as_dataset(dataset)
    total = _dataset_len(data)
    if total == 0:
        raise DataError("the calibration data set is empty.")
    if samples is not None and samples < total:
        data = calibration_subset(data, samples, seed=seed)
    n_samples = _dataset_len(data)

    targets, explicit = _resolve_targets(model, layers)
    stats = {name: _empty_stats(module, kind) for name, (module, kind) in targets.items()}
    hit: dict[str, bool] = {}
    state = _BatchState()
    handles = []
    for name, (module, _) in targets.items():
        target = stats[name]
        hook = (_embedding_hook(name, target, hit, state) if isinstance(target, DiagonalStats)
                else _statistics_hook(name, target, hit, state, batch_size))
        handles.append(module.register_forward_pre_hook(hook))
    try:
        _run_batches(model, data, batch_size, n_samples, stats, hit, state, progress)
    finally:
        for handle in handles:
            handle.remove()
    _finish(stats, explicit, n_samples)
    from .memory import release_memory

    release_memory()  # the batches' activations and float64 copies are gone: give their pages back
    alias_of: dict[str, str] = {}
    names = aliases(model)
    for name, (module, _) in targets.items():
        if name in stats:
            for alias in names.get(id(module), []):
                if alias and alias != name:
                    alias_of[alias] = name
    return Calibration(stats, n_samples, alias_of)


class _BatchState:
    """What the hooks of one calibration batch share: its index, the token mask, the last input's moments."""

    def __init__(self) -> None:
        self.index = 0
        self.token_mask: torch.Tensor | None = None
        # Layers fed the very same tensor that read the same rows from it (query/key/value projections) share
        # one summary of it; a ResNet's 3×3 conv and its 1×1 shortcut read other patches of one tensor and do
        # not. The tensor is held, so no other tensor can take its memory and be mistaken for it.
        self.last_input: torch.Tensor | None = None
        self.last_rows: tuple | None = None
        self.last_moments: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def start(self, index: int, inputs: Any) -> None:
        self.index = index
        self.last_input, self.last_rows, self.last_moments = None, None, None
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        self.token_mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


    def same_as_last(self, x: torch.Tensor, rows: tuple) -> bool:
        last = self.last_input
        return (last is not None and self.last_moments is not None and rows == self.last_rows
                and last.data_ptr() == x.data_ptr()
                and last.shape == x.shape and last.stride() == x.stride() and last.dtype == x.dtype
                and last.device == x.device and last._version == x._version)


def _embedding_hook(name: str, target: DiagonalStats, hit: dict[str, bool], state: _BatchState):
    """A forward pre-hook counting an Embedding's lookups (real tokens only, given an attention mask)."""
    def hook(mod, args):
        if not args or not isinstance(args[0], torch.Tensor) or args[0].is_floating_point():
            raise _HookError(DataError(f"layer '{name}' (Embedding) was called without integer indices; it cannot "
                                       "be calibrated."))
        indices = args[0].detach()
        mask = state.token_mask
        if mask is not None and tuple(indices.shape) == tuple(mask.shape):
            indices = indices[mask.to(indices.device)]
        try:
            target.update_indices(indices)
        except ConfigError as exc:
            raise _HookError(DataError(f"layer '{name}': {exc}")) from None
        hit[name] = True
    return hook


def _statistics_hook(name: str, target: InputStats, hit: dict[str, bool], state: _BatchState, batch_size: int):
    """A forward pre-hook streaming one layer's inputs into ``target``."""
    def hook(mod, args):
        if not args or not isinstance(args[0], torch.Tensor):
            raise _HookError(DataError(f"layer '{name}' was called without a tensor input; it cannot be "
                                       "calibrated."))
        x = args[0].detach()
        rows_read = _rows_read(mod)
        if target.kind == "full" and state.same_as_last(x, rows_read):
            assert state.last_moments is not None
            target.merge(*state.last_moments)  # the same tensor the previous layer summarised
            hit[name] = True
            return
        if not torch.isfinite(x).all():
            first = state.index * batch_size
            raise _HookError(DataError(
                f"layer '{name}' received NaN or Inf inputs in calibration batch {state.index + 1} "
                f"(samples {first}..{first + x.shape[0] - 1} of the calibration set); check the data and the "
                "layers before it."))
        try:
            _, chunks = _layer_rows(mod, name, x, state.token_mask)
            batch = InputStats("full", target.dim, pack=False) if target.kind == "full" else None
            for rows in chunks:
                rows = rows.to(torch.float64)
                if target.kind == "channel":
                    S, k = target.dim, math.prod(target.kernel_size or ())
                    target.update(rows.reshape(-1, S, k).transpose(1, 2).reshape(-1, S))
                    target.update_patch_mean(rows)
                else:
                    assert batch is not None
                    batch.update(rows)
            if batch is not None:
                moments = (batch.count, *batch._moments())
                target.merge(*moments)
                state.last_input, state.last_rows, state.last_moments = x, rows_read, moments
        except DataError as exc:
            raise _HookError(exc) from None
        hit[name] = True
    return hook


def _run_batches(model: nn.Module, data: Dataset, batch_size: int, n_samples: int, stats: dict[str, Any],
                 hit: dict[str, bool], state: _BatchState, progress: bool) -> None:
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_samples, desc="calibrating", unit="sample", leave=False)
    try:
        with torch.no_grad(), eval_mode(model), model_inputs.hookable():
            for index, (inputs, _) in enumerate(iterate_batches(data, batch_size)):
                hit.clear()
                inputs = to_model(inputs, model)
                state.start(index, inputs)
                rows = model_inputs.batch_size(inputs)
                try:
                    model_inputs.call_model(model, inputs)
                except _HookError as exc:
                    raise exc.error from None
                except RankshrinkError:
                    raise
                except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as exc:
                    raise model_inputs.failure(model, inputs, exc,
                                               what=f"the calibration data (batch {index + 1})") from None
                for name in hit:
                    stats[name].samples += rows
                if bar is not None:
                    bar.update(rows)
    finally:
        if bar is not None:
            bar.close()


def _finish(stats: dict[str, Any], explicit: bool, n_samples: int) -> None:
    """Refuse or drop layers the data never reached; warn about rank-deficient statistics."""
    unreached = [name for name, s in stats.items() if s.count == 0]
    if unreached and explicit:
        raise DataError(f"the calibration data never reached layer(s) {', '.join(repr(n) for n in unreached)} "
                        f"in {n_samples} samples (an unused branch, or a path the data does not take); "
                        "remove them from the plan or use fit='weights' for them.")
    for name in unreached:
        warnings.warn(f"layer '{name}' was never reached by the {n_samples} calibration samples (unused branch?); "
                      "it has no statistics and can only be factorized with fit='weights'.",
                      CalibrationWarning, stacklevel=3)
        del stats[name]
    for name, s in stats.items():
        if isinstance(s, DiagonalStats):  # lookup counts: fewer lookups than rows is expected, not a warning
            s.counts = s._counts().cpu()
            continue
        s.to_cpu()
        if s.count < s.dim:
            warnings.warn(f"layer '{name}': only {s.count} input vectors (from {s.samples} calibration samples) for "
                          f"{s.dim}-dimensional inputs, so its input statistics are rank-deficient and the "
                          f"activation-optimal factors may over-fit them; calibrate with at least {s.dim} vectors "
                          "(more samples), or raise damping.", CalibrationWarning, stacklevel=3)
