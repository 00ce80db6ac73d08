"""Model inputs of any form: a tensor, a tuple (positional arguments) or a dict (keyword arguments).

Every place that runs a user's model goes through these pure helpers, so a model taking
``forward(image, side)`` or ``forward(**{"input_ids": ..., "attention_mask": ...})`` works
wherever a one-tensor model does (counting, calibration, metrics, the search, training,
LoRA, ONNX export):

* :func:`call_model` -- ``model(x)``, ``model(*inputs)`` or ``model(**inputs)``;
* :func:`batch_size`, :func:`take`, :func:`concat` -- rows of a structure (every tensor's
  first dimension is the batch);
* :func:`to_model` -- a structure moved to the model's device, floating tensors cast to its dtype;
* :func:`describe`, :func:`leaves` -- shapes for messages, named tensors for export;
* :func:`check_signature` / :func:`failure` -- errors that name the input and the layer;
* :func:`output_tensor` -- the logits of a model that returns a tensor or a ``{"logits": ...}`` mapping;
* :func:`hookable` -- turns off fused fast paths (``MultiheadAttention``, ``TransformerEncoderLayer``)
  that skip their submodules, so forward hooks see every layer.

A structure's leaves are tensors; nested tuples/lists/dicts are walked, anything else (None,
numbers, strings) is passed through unchanged and has no rows.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .errors import DataError

__all__ = ["Inputs", "call_model", "map_tensors", "leaves", "batch_size", "take", "concat", "to_model",
           "device_of", "float_dtype_of", "describe", "sample_shapes", "check_signature", "failure",
           "output_tensor", "hookable", "call_checked", "is_structure", "input_names", "rebuild"]

Inputs = Any  # torch.Tensor | tuple/list of inputs | Mapping[str, inputs]


def is_structure(value: Any) -> bool:
    """Whether ``value`` is a tensor or a tuple/list/dict holding at least one tensor."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return any(is_structure(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return any(is_structure(v) for v in value)
    return False


def map_tensors(fn: Callable[[torch.Tensor], Any], inputs: Inputs) -> Inputs:
    """``inputs`` with ``fn`` applied to every tensor (containers keep their type; tuples stay tuples)."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {key: map_tensors(fn, value) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        mapped = [map_tensors(fn, value) for value in inputs]
        return mapped if isinstance(inputs, list) else tuple(mapped)
    return inputs


def leaves(inputs: Inputs, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor, in order: ``input`` for a lone tensor, the key for a dict
    entry, ``input_0``... for positional inputs; nested names joined with ``.``."""
    if isinstance(inputs, torch.Tensor):
        return [(prefix or "input", inputs)]
    found: list[tuple[str, torch.Tensor]] = []
    if isinstance(inputs, Mapping):
        for key, value in inputs.items():
            found += leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(inputs, (tuple, list)):
        for index, value in enumerate(inputs):
            found += leaves(value, f"{prefix}.{index}" if prefix else f"input_{index}")
    return found


def input_names(inputs: Inputs) -> list[str]:
    return [name for name, _ in leaves(inputs)]


def rebuild(template: Inputs, tensors: Sequence[torch.Tensor]) -> Inputs:
    """``template`` with its tensors replaced, in :func:`leaves` order, by ``tensors``."""
    queue = iter(tensors)
    return map_tensors(lambda _: next(queue), template)


def call_model(model: Callable[..., Any], inputs: Inputs) -> Any:
    """Run ``model`` on ``inputs``: a tuple/list is positional arguments, a dict keyword arguments."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def batch_size(inputs: Inputs) -> int:
    """The number of rows (the first dimension, equal for every tensor)."""
    sizes = {name: (int(t.shape[0]) if t.dim() else None) for name, t in leaves(inputs)}
    if not sizes:
        raise DataError("the model inputs hold no tensor.")
    if any(size is None for size in sizes.values()):
        bad = next(name for name, size in sizes.items() if size is None)
        raise DataError(f"model input '{bad}' is a 0-dimensional tensor; inputs need a batch (first) dimension.")
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"'{n}' has {s}" for n, s in sizes.items())
        raise DataError(f"the model inputs disagree on the number of samples ({shown}); every input needs one row "
                        "per sample.")
    return next(iter(sizes.values()))  # type: ignore[return-value]


def take(inputs: Inputs, index: Any) -> Inputs:
    """Rows ``index`` (an int, a slice or an index tensor) of every tensor."""
    return map_tensors(lambda t: t[index], inputs)


def concat(parts: Sequence[Inputs]) -> Inputs:
    """Concatenate structures of the same form along the batch dimension."""
    if not parts:
        raise DataError("nothing to concatenate: no batches.")
    first = parts[0]
    flat = [leaves(part) for part in parts]
    names = [name for name, _ in flat[0]]
    for index, other in enumerate(flat[1:], start=1):
        if [name for name, _ in other] != names:
            raise DataError(f"batch {index} has inputs {[n for n, _ in other]}, the first batch {names}; every "
                            "sample must have the same inputs.")
    joined = []
    for column, name in enumerate(names):
        tensors = [entry[column][1] for entry in flat]
        shapes = {tuple(t.shape[1:]) for t in tensors}
        if len(shapes) > 1:
            raise DataError(f"input '{name}' has samples of different shapes {sorted(shapes)}; pad or resize them "
                            "to one shape.")
        joined.append(torch.cat(tensors))
    return rebuild(first, joined)


def device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def float_dtype_of(model: nn.Module) -> torch.dtype | None:
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def to_model(inputs: Inputs, model: nn.Module) -> Inputs:
    """``inputs`` on the model's device; floating tensors in the model's floating dtype.

    Data sets hold float32; a float16/bfloat16 (or float64) model gets its inputs cast
    instead of failing with a dtype mismatch. Integer tensors (token ids, indices) keep their dtype.
    """
    device = device_of(model)
    dtype = float_dtype_of(model)

    def move(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t

    return map_tensors(move, inputs)


def sample_shapes(inputs: Inputs) -> Any:
    """Per-sample shapes (the batch dimension dropped), in the structure's form."""
    return map_tensors(lambda t: tuple(t.shape[1:]), inputs)


def describe(inputs: Inputs, *, per_sample: bool = False) -> str:
    """``(1, 8, 8)`` for a tensor, ``image (1, 8, 8), side (4,)`` for several inputs."""
    items = leaves(inputs)
    shown = [(name, tuple(t.shape[1:]) if per_sample else tuple(t.shape)) for name, t in items]
    if len(shown) == 1 and isinstance(inputs, torch.Tensor):
        return str(shown[0][1])
    return ", ".join(f"{name} {shape}" for name, shape in shown) or "no tensors"


# --------------------------------------------------------------------------- errors that name the input and layer

def _forward_parameters(model: nn.Module) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None


def check_signature(model: nn.Module, inputs: Inputs) -> None:
    """Refuse inputs ``model.forward`` cannot take (unknown keywords, too many or too few arguments)."""
    params = _forward_parameters(model)
    if params is None:
        return
    kinds = {p.kind for p in params}
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                             p.KEYWORD_ONLY, p.POSITIONAL_ONLY)]
    signature = f"{type(model).__name__}.forward({', '.join(p.name for p in params)})"
    if isinstance(inputs, Mapping):
        unknown = [key for key in inputs if key not in names]
        if unknown and inspect.Parameter.VAR_KEYWORD not in kinds:
            raise DataError(f"the data has input(s) {', '.join(map(repr, unknown))} that {signature} does not take; "
                            "name the data's inputs (x.NAME) after the forward() arguments.")
        missing = [name for name in required if name not in inputs]
        if missing:
            raise DataError(f"{signature} needs {', '.join(map(repr, missing))}, which the data does not provide "
                            f"(it has {', '.join(map(repr, inputs)) or 'nothing'}).")
        return
    count = len(inputs) if isinstance(inputs, (tuple, list)) else 1
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if inspect.Parameter.VAR_POSITIONAL not in kinds and count > len(positional):
        raise DataError(f"the data has {count} inputs per sample but {signature} takes {len(positional)}.")
    if count < len([p for p in positional if p.default is p.empty]):
        raise DataError(f"{signature} needs {len([p for p in positional if p.default is p.empty])} inputs but the "
                        f"data has {count} per sample.")


def _expected(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"expects inputs of shape (..., {module.in_features})"
    if isinstance(module, nn.modules.conv._ConvNd):
        dims = len(module.kernel_size)
        return f"expects (batch, {module.in_channels}, {', '.join(['…'] * dims)}) inputs"
    if isinstance(module, (nn.RNNBase,)):
        return f"expects inputs with {module.input_size} features"
    if isinstance(module, nn.Embedding):
        return f"expects integer indices below {module.num_embeddings}"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return f"expects {module.num_features} channels"
    return ""


def _shape_text(args: tuple, kwargs: Mapping[str, Any]) -> str:
    shapes = [f"{tuple(a.shape)} {str(a.dtype).replace('torch.', '')}" for a in args if isinstance(a, torch.Tensor)]
    shapes += [f"{k}={tuple(v.shape)}" for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return ", ".join(shapes) or "no tensor"


def failure(model: nn.Module, inputs: Inputs, error: BaseException, *, what: str = "the data") -> DataError:
    """A DataError naming the layer ``model`` failed in on ``inputs``, its input shape and what it expects.

    Runs ``inputs`` once more with hooks that track which module is executing (only after a
    failure, so normal runs pay nothing).
    """
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(inputs, Mapping) or isinstance(inputs, (tuple, list)):
        try:
            check_signature(model, inputs)
        except DataError as exc:
            return exc
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[tuple[str, nn.Module, tuple, dict]] = []
    failed: list[tuple[str, nn.Module, tuple, dict]] = []

    def pre(module, args, kwargs):
        stack.append((names.get(id(module), type(module).__name__), module, args, kwargs))

    def post(module, args, kwargs, output):
        if stack:
            stack.pop()

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in model.modules()]
    handles += [m.register_forward_hook(post, with_kwargs=True) for m in model.modules()]
    try:
        with torch.no_grad():
            call_model(model, inputs)
    except Exception:  # the same failure again: the innermost module still on the stack is where it happened
        failed = list(stack)
    finally:
        for handle in handles:
            handle.remove()
    shapes = describe(inputs)
    if failed and failed[-1][0] != "":
        name, module, args, kwargs = failed[-1]
        expects = _expected(module)
        return DataError(f"{what} does not fit the model: layer '{name}' ({type(module).__name__}"
                         f"{', ' + expects if expects else ''}) got {_shape_text(args, kwargs)}, from model inputs "
                         f"{shapes}: {type(error).__name__}: {first_line}")
    return DataError(f"{what} does not fit the model: {type(model).__name__} failed on inputs {shapes}: "
                     f"{type(error).__name__}: {first_line}")


def call_checked(model: nn.Module, inputs: Inputs, *, what: str = "the data") -> Any:
    """:func:`call_model`, with a failure turned into a DataError naming the layer and the shapes."""
    from .errors import RankshrinkError

    try:
        return call_model(model, inputs)
    except RankshrinkError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AssertionError) as exc:
        raise failure(model, inputs, exc, what=what) from None


def output_tensor(output: Any, *, what: str = "the model") -> torch.Tensor:
    """The tensor of logits in ``output``: itself, or the ``logits`` entry of a mapping / model output."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise DataError(f"{what} returned {type(output).__name__}, not a tensor of logits (or a mapping with 'logits').")


@contextlib.contextmanager
def hookable() -> Iterator[None]:
    """Turn off fused attention fast paths (they bypass submodules and their hooks) for the block."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)
