"""ONNX export that is right on real inputs, checked against PyTorch on ONNX Runtime before anything is written.

An export passing on its own example can still be wrong on real inputs: the TorchScript
exporter *traces* one forward pass, so a branch on the data (``if x.sum() > 0``) or a size
read from a tensor (``x[:, :int(mask.sum())]``) is frozen at what the example did. Measured:
one such export passed the check on its all-zeros example and then differed by 0.52 on real
inputs, another by 0.20. So:

* tracer warnings about data-dependent control flow ("Converting a tensor to a Python
  boolean/integer/...", "Iterating over a tensor") are errors that name the module and the
  source line (``allow_traced_branches=True`` turns them back into warnings);
* :func:`verify_onnx` runs the graph on ONNX Runtime against PyTorch on a held-out batch of
  real inputs at several batch sizes and, for every axis declared dynamic besides the batch
  (``dynamic_axes={"input_ids": [1]}``), at several lengths;
* a module that does not export is named (the exporter's own error rarely says where).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .. import inputs as model_inputs
from ..errors import ConfigError, RankshrinkError
from ..files import atomic_path

__all__ = ["ExportError", "onnx_bytes", "export_onnx", "verify_onnx", "Verification", "require_onnxruntime",
           "ort_session", "onnx_feed", "normalize_dynamic_axes", "TRACED_BRANCH_WARNINGS", "VERIFY_BATCHES"]

# TracerWarning texts that mean the trace froze a decision the data makes.
TRACED_BRANCH_WARNINGS = ("Converting a tensor to a Python", "Iterating over a tensor")
VERIFY_BATCHES = (1, 3, 32)          # batch sizes the graph is checked at (capped by the held-out batch)
VERIFY_LENGTHS = (1.0, 0.5, 0.25)    # fractions of a dynamic non-batch axis it is checked at
_TOLERANCE = 1e-3                    # largest |ONNX - PyTorch| relative to max(1, max |PyTorch|)


class ExportError(RankshrinkError, RuntimeError):
    """ONNX export or ONNX Runtime is unavailable or failed."""


def require_onnxruntime():
    try:
        import onnx  # noqa: F401  (the exporter needs it; fail here with a clear message)
        import onnxruntime
    except ImportError:
        raise ExportError("ONNX export and latency measurement need the 'onnx' and 'onnxruntime' packages: "
                          "pip install 'rankshrink[onnx]' (rankshrink compress: --no-export --ignore-latency "
                          "works without them).") from None
    return onnxruntime


class _Flat(nn.Module):
    """The model called with its inputs as flat positional tensors (how ONNX graphs take them)."""

    def __init__(self, model: nn.Module, template: Any):
        super().__init__()
        self.model = model
        self.template = template

    def forward(self, *tensors: torch.Tensor) -> Any:
        return model_inputs.call_model(self.model, model_inputs.rebuild(self.template, tensors))


def _outputs(model: nn.Module, inputs: Any) -> list[Any]:
    with torch.no_grad():
        out = model_inputs.call_model(model, inputs)
    if isinstance(out, torch.Tensor):
        return [out.detach().cpu().numpy()]
    return [t.detach().cpu().numpy() for _, t in model_inputs.leaves(out)]


def _output_names(model: nn.Module, example_input: Any) -> list[str]:
    count = len(_outputs(model, example_input))
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def onnx_feed(example_input: Any) -> dict[str, Any]:
    """ONNX Runtime's feed for ``example_input``: every input tensor by its graph name."""
    return {name: tensor.detach().cpu().numpy() for name, tensor in model_inputs.leaves(example_input)}


def normalize_dynamic_axes(example_input: Any,
                           dynamic_axes: Mapping[str, Iterable[int]] | None) -> dict[str, list[int]]:
    """``{input name: [axes]}`` checked against the example: known names, axes inside the tensor, never axis 0
    (the batch axis is always dynamic)."""
    shapes = {name: tuple(t.shape) for name, t in model_inputs.leaves(example_input)}
    result: dict[str, list[int]] = {}
    for name, axes in (dynamic_axes or {}).items():
        if name not in shapes:
            raise ConfigError(f"dynamic axis: the model has no input '{name}'; its inputs are "
                              f"{', '.join(shapes)}.")
        for axis in ([axes] if isinstance(axes, int) else list(axes)):
            if isinstance(axis, bool) or not isinstance(axis, int) or not 1 <= axis < len(shapes[name]):
                raise ConfigError(f"dynamic axis {name}:{axis}: input '{name}' has shape {list(shapes[name])}, so "
                                  f"its axes are 1..{len(shapes[name]) - 1} (axis 0, the batch, is always dynamic).")
            result.setdefault(name, [])
            if axis not in result[name]:
                result[name].append(axis)
    return result


@dataclass
class _Tracked:
    """Which module the forward pass is in (forward hooks keep a stack of qualified names)."""

    model: nn.Module
    stack: list[str] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)

    def __enter__(self) -> "_Tracked":
        for name, module in self.model.named_modules():
            self.handles.append(module.register_forward_pre_hook(lambda m, a, name=name: self.stack.append(name)))
            self.handles.append(module.register_forward_hook(lambda m, a, o, name=name: self._leave(name)))
        return self

    def _leave(self, name: str) -> None:
        if self.stack and self.stack[-1] == name:
            self.stack.pop()

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()

    def where(self) -> str | None:
        """The innermost module entered and not left (None: outside every submodule)."""
        inner = [name for name in self.stack if name]
        return inner[-1] if inner else None


def _module_label(model: nn.Module, name: str | None) -> str:
    if name is None:
        return f"the model ({type(model).__name__})"
    try:
        kind = type(model.get_submodule(name)).__name__
    except AttributeError:
        kind = "module"
    return f"module '{name}' ({kind})"


def _first(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _failing_module(model: nn.Module, example_input: Any, opset: int) -> str | None:
    """The smallest submodule that does not export on its own inputs (None if each exports), for errors that
    the exporter raises after tracing, where no forward hook says where the failing op was."""
    recorded: dict[str, tuple] = {}
    handles = []
    for name, module in model.named_modules():
        if name:
            def keep(m, args, name=name):
                if name not in recorded and args and all(isinstance(a, torch.Tensor) for a in args):
                    recorded[name] = tuple(a.detach() for a in args)
            handles.append(module.register_forward_pre_hook(keep))
    try:
        with torch.no_grad():
            model_inputs.call_model(model, example_input)
    except Exception:
        return None
    finally:
        for handle in handles:
            handle.remove()
    # Deepest first: a leaf that fails is the answer, not the block holding it.
    for name in sorted(recorded, key=lambda n: (-n.count("."), n))[:300]:
        args = recorded[name]
        try:
            with warnings.catch_warnings(), _quiet_stdout():
                warnings.simplefilter("ignore")
                torch.onnx.export(model.get_submodule(name), args, io.BytesIO(),  # type: ignore[arg-type]
                                  opset_version=opset, **_exporter_kwargs())
        except Exception:
            return name
    return None


@contextlib.contextmanager
def _quiet_stdout():
    """File descriptor 1 sent to /dev/null: the exporter's C++ side prints its IR graph there on failure,
    which would break ``--json`` output (a Python-level redirect does not reach it)."""
    import sys

    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):  # no real stdout (embedded interpreters)
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            try:
                yield
            finally:
                try:
                    sys.stdout.flush()
                except (OSError, ValueError):
                    pass
                os.dup2(saved, 1)
    finally:
        os.close(saved)


def _exporter_kwargs() -> dict[str, Any]:
    # The TorchScript exporter needs no extra packages and keeps names.
    return {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}


def onnx_bytes(model: nn.Module, example_input: Any, *, opset: int = 17, dynamic_batch: bool = True,
               dynamic_axes: Mapping[str, Iterable[int]] | None = None,
               allow_traced_branches: bool = False) -> bytes:
    """Serialise ``model`` (in eval mode, on a copy) to an ONNX graph.

    ``example_input``: one batch -- a tensor (graph input ``input``), a tuple (``input_0``,
    ``input_1``, ...) or a dict (its keys); every input and output gets a dynamic batch axis,
    and ``dynamic_axes`` (``{"input_ids": [1]}``) declares more. A tracer warning about
    data-dependent control flow raises :class:`ExportError` naming the module and the source
    line, unless ``allow_traced_branches``; a module that does not export is named.
    """
    require_onnxruntime()
    model = copy.deepcopy(model).eval()
    names = model_inputs.input_names(example_input)
    outputs = _output_names(model, example_input)
    extra = normalize_dynamic_axes(example_input, dynamic_axes)
    kwargs: dict[str, Any] = dict(input_names=names, output_names=outputs, opset_version=opset,
                                  do_constant_folding=True, **_exporter_kwargs())
    if dynamic_batch or extra:
        axes: dict[str, dict[int, str]] = {}
        for name in names + outputs:
            axes[name] = {0: "batch"} if dynamic_batch else {}
        for name, wanted in extra.items():
            axes[name].update({axis: f"{name}_{axis}" for axis in wanted})
        kwargs["dynamic_axes"] = {name: dims for name, dims in axes.items() if dims}
    flat = _Flat(model, example_input)
    tensors = tuple(t for _, t in model_inputs.leaves(example_input))
    buffer = io.BytesIO()
    branches: list[tuple[str, str, str | None]] = []
    with _Tracked(model) as tracked, warnings.catch_warnings():
        warnings.simplefilter("always")

        def show(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            if category.__name__ == "TracerWarning" and text.startswith(TRACED_BRANCH_WARNINGS):
                branches.append((text, f"{os.path.basename(filename)}:{lineno}", tracked.where()))

        warnings.showwarning = show  # restored by catch_warnings
        try:
            # The TorchScript exporter writes to file objects too; torch annotates ``f`` as a path only. On
            # failure it prints its whole IR graph to stdout: the error below says what matters.
            with _quiet_stdout():
                torch.onnx.export(flat, tensors, buffer, **kwargs)  # type: ignore[arg-type]
        except Exception as exc:  # the exporter raises many types; report them as one, naming the module
            where = tracked.where()
            if where is None:
                where = _failing_module(model, example_input, opset)
            raise ExportError(f"ONNX export failed in {_module_label(model, where)}: {type(exc).__name__}: "
                              f"{_first(str(exc))[:300]}. Rewrite that module's forward with ONNX-exportable "
                              "ops, or skip the ONNX file (compress --no-export).") from None
    if branches:
        text, place, where = branches[0]
        kind = text.split(" might")[0].replace("Converting a tensor to a ", "converts a tensor to a ")
        found = (f"{_module_label(model, where)} {kind[0].lower() + kind[1:]} at {place}, so the ONNX graph does "
                 f"what this one example did on every input ({len(branches)} such place(s) in all)")
        if not allow_traced_branches:
            raise ExportError(f"the exported graph froze a data-dependent decision: {found}. Make the forward "
                              "independent of the values (torch.where instead of if, fixed sizes), pass "
                              "--allow-traced-branches to export it anyway (the graph is still checked on real "
                              "inputs), or --no-export.")
        warnings.warn(f"exported with traced branches allowed: {found}; the graph is checked on real inputs.",
                      RuntimeWarning, stacklevel=2)
    return buffer.getvalue()


@dataclass
class Verification:
    """What :func:`verify_onnx` ran: batch sizes, the lengths of each dynamic axis, the largest difference found
    (relative to max(1, max |PyTorch output|)) and the number of input rows."""

    batches: list[int]
    lengths: dict[str, list[int]]
    max_error: float
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _slice_axes(inputs: Any, axes: Mapping[str, list[int]], fraction: float) -> tuple[Any, dict[str, list[int]]]:
    """``inputs`` with every declared dynamic axis cut to ``fraction`` of its length (at least 1)."""
    lengths: dict[str, list[int]] = {}
    tensors = []
    for name, tensor in model_inputs.leaves(inputs):
        for axis in axes.get(name, []):
            size = max(1, int(math.floor(tensor.shape[axis] * fraction)))
            tensor = tensor.narrow(axis, 0, size)
            lengths.setdefault(name, []).append(size)
        tensors.append(tensor)
    return model_inputs.rebuild(inputs, tensors), lengths


def verify_onnx(model: nn.Module, graph: bytes, inputs: Any, *,
                dynamic_axes: Mapping[str, Iterable[int]] | None = None,
                batches: Iterable[int] = VERIFY_BATCHES, threads: int = 1,
                tolerance: float = _TOLERANCE) -> Verification:
    """Run ``graph`` on ONNX Runtime and ``model`` in PyTorch on real ``inputs`` (a held-out batch, any input
    form) at each batch size in ``batches`` (capped by the rows available) and, for each axis declared dynamic
    besides the batch, at several lengths (all of it, half, a quarter); raise :class:`ExportError` saying where
    they differ."""
    ort = require_onnxruntime()
    model = copy.deepcopy(model).eval()
    axes = normalize_dynamic_axes(inputs, dynamic_axes)
    available = model_inputs.batch_size(inputs)
    sizes = sorted({min(int(b), available) for b in batches})
    session = ort_session(ort, graph, threads)
    fractions = VERIFY_LENGTHS if axes else (1.0,)
    worst, seen_lengths = 0.0, {}  # type: tuple[float, dict[str, list[int]]]
    for fraction in fractions:
        cut, lengths = _slice_axes(inputs, axes, fraction)
        for name, values in lengths.items():
            seen_lengths.setdefault(name, [])
            seen_lengths[name] += [v for v in values if v not in seen_lengths[name]]
        for size in sizes:
            batch = model_inputs.take(cut, slice(0, size))
            where = f"batch size {size}" + "".join(f", {n} length {v}" for n, vs in lengths.items() for v in vs)
            try:
                got = session.run(None, onnx_feed(batch))
            except Exception as exc:  # ONNX Runtime raises its own types
                raise ExportError(f"the exported graph fails on ONNX Runtime at {where} on real inputs "
                                  f"({type(exc).__name__}: {_first(str(exc))[:200]}); a size is probably fixed in "
                                  "the graph: declare it dynamic (--dynamic-axis NAME:AXIS) or skip the ONNX file "
                                  "(--no-export).") from None
            expected = _outputs(model, batch)
            for index, (g, e) in enumerate(zip(got, expected)):
                if g.shape != e.shape:
                    raise ExportError(f"the exported graph's output {index} has shape {list(g.shape)} at {where} on "
                                      f"real inputs, PyTorch's {list(e.shape)}; not written (--no-export skips the "
                                      "ONNX file).")
                if not e.size:
                    continue
                scale = max(1.0, float(abs(e).max()))
                error = float(abs(g.astype("float64") - e.astype("float64")).max()) / scale
                worst = max(worst, error)
                if not error <= tolerance:
                    raise ExportError(f"the exported graph differs from PyTorch on real inputs: largest difference "
                                      f"{error * scale:.3g} (relative {error:.2g}) at {where}; the forward probably "
                                      "depends on the data in a way the trace froze (a branch or a size read from a "
                                      "tensor). Not written; --no-export skips the ONNX file.")
    return Verification(sizes, seen_lengths, worst, available)


def export_onnx(model: nn.Module, example_input: Any, path: str | os.PathLike, *,
                opset: int = 17, check: bool = True, verify_inputs: Any = None,
                dynamic_axes: Mapping[str, Iterable[int]] | None = None,
                allow_traced_branches: bool = False) -> Path:
    """Write ``model`` as ONNX to ``path`` (atomically).

    With ``check`` the graph is verified against PyTorch on ONNX Runtime before anything is
    written (:func:`verify_onnx`): on ``verify_inputs`` (a held-out batch of real inputs;
    default: ``example_input``) at several batch sizes and dynamic-axis lengths.
    ``dynamic_axes`` and ``allow_traced_branches`` are :func:`onnx_bytes`'s.
    """
    data = onnx_bytes(model, example_input, opset=opset, dynamic_axes=dynamic_axes,
                      allow_traced_branches=allow_traced_branches)
    if check:
        verify_onnx(model, data, verify_inputs if verify_inputs is not None else example_input,
                    dynamic_axes=dynamic_axes)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def ort_session(ort, data: bytes, threads: int, *, profile_prefix: str | None = None):
    """An ONNX Runtime CPU session for a serialised graph, with ``threads`` intra-op threads; with
    ``profile_prefix``, its profiler on (``end_profiling()`` writes the events to a file of that prefix)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
