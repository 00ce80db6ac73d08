"""The one way to load a model SPEC: ``builtin:NAME``, ``path/to/file.py:factory``, ``path/to/model.onnx``
or ``hf:DIR``.

``path/to/file.py:factory`` imports the file by path and calls ``factory()`` (a function
that takes no arguments and returns an ``nn.Module``). ``path/to/model.onnx`` is converted
to torch (:mod:`.onnx_in`, needs onnx2torch); the file carries its own weights. ``hf:DIR`` is a local
Hugging Face model directory loaded with ``AutoModel``, offline (:mod:`.hf`, needs transformers).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

from torch import nn

from ..errors import ConfigError, FileFormatError
from .builtin import BUILTIN_MODELS, builtin_entry, load_builtin
from .weights import check_finite, load_weights

__all__ = ["load_model_spec"]


def import_python_file(file_part: str | Path, what: str = "model file") -> tuple[Path, object]:
    """(path, module) of a Python file imported by path (helpers next to it importable)."""
    from ..files import require_file

    path = require_file(Path(file_part).expanduser(), what)
    module_name = "rankshrink_user_model_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise FileFormatError(f"{what} '{path}' cannot be imported as a Python module.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    # The file may import helpers that sit next to it.
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    except SystemExit as exc:  # a script's sys.exit() must not end rankshrink silently (or with its code)
        sys.modules.pop(module_name, None)
        raise ConfigError(f"importing {what} '{path}' called sys.exit({_exit_code(exc)}); a {what} must "
                          "only define functions (put script code under if __name__ == '__main__':).") from None
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise ConfigError(f"importing {what} '{path}' failed: {type(exc).__name__}: {exc}") from exc
    finally:
        try:
            sys.path.remove(str(path.parent.resolve()))
        except ValueError:
            pass
    return path, module


def function_from_file(file_part: str | Path, attr: str, what: str = "model file"):
    """(path, the function ``attr``) from a Python file, with errors listing what the file has."""
    path, module = import_python_file(file_part, what)
    factory = getattr(module, attr, None)
    if factory is None:
        callables = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(f"{what} '{path}' has no attribute '{attr}'; callables in it: "
                          f"{', '.join(callables) or 'none'}.")
    if not callable(factory):
        raise ConfigError(f"'{attr}' in {what} '{path}' is a {type(factory).__name__}, not a "
                          "function; name a function.")
    return path, factory


def _import_factory(file_part: str, attr: str) -> nn.Module:
    path, factory = function_from_file(file_part, attr)
    sys.path.insert(0, str(path.parent.resolve()))  # a factory may import helpers lazily
    try:
        model = factory()
    except SystemExit as exc:
        raise ConfigError(f"calling {attr}() from '{path}' called sys.exit({_exit_code(exc)}); the factory must "
                          "return an nn.Module, not exit.") from None
    except Exception as exc:
        raise ConfigError(f"calling {attr}() from '{path}' failed: {type(exc).__name__}: {exc} "
                          "(the factory must take no arguments and return an nn.Module).") from exc
    finally:
        try:
            sys.path.remove(str(path.parent.resolve()))
        except ValueError:
            pass
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{attr}() from '{path}' returned a {type(model).__name__}, not a "
                          "torch.nn.Module.")
    return model


def _exit_code(exc: SystemExit) -> str:
    return "" if exc.code is None else repr(exc.code)[:40]


def load_model_spec(spec: str, weights: str | Path | None = None, *,
                    trust_pickle: bool = False, progress: bool = True, data=None) -> nn.Module:
    """Build the model a SPEC names, load ``weights`` strictly if given, return it in eval mode.

    ``builtin:NAME`` without weights returns the cached trained model (training it on
    first use on ``data``, a :class:`~rankshrink.data.Splits`, or its default data, with a
    progress bar unless ``progress`` is False); with weights, the model is built for the shapes
    of ``data`` (default: its default data's), so ``builtin:mnist-mlp`` has 784 inputs on MNIST
    and 64 on the digits. ``FILE.py:FACTORY`` imports the file by path and calls ``FACTORY()``.
    ``FILE.onnx`` is converted to torch with onnx2torch (weights in ``Constant`` nodes included).
    ``hf:DIR`` loads a local Hugging Face model directory with ``AutoModel`` (offline, never downloading).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("a model spec must be a non-empty string such as builtin:digits-cnn or "
                          "model.py:make_model.")
    spec = spec.strip()
    if spec.startswith("builtin:"):
        name = spec[len("builtin:"):]
        entry = builtin_entry(name)
        if data is not None and not (isinstance(data.input_shape, tuple)
                                     and all(isinstance(d, int) for d in data.input_shape)):
            raise ConfigError(f"built-in model '{name}' takes one image tensor; the data has inputs "
                              f"{data.input_shape}. Use your own model (file.py:factory) for several inputs.")
        if weights is None:
            return load_builtin(name, data=data, progress=progress)[0]
        model = entry.create(data.input_shape if data is not None else None,
                             data.num_classes if data is not None else None)
    elif spec.startswith("hf:"):
        from .hf import load_hf_model

        model = load_hf_model(spec)
    elif spec.lower().endswith(".onnx"):
        if weights is not None:
            raise ConfigError(f"model '{spec}' is an ONNX file, which carries its own weights; drop --weights.")
        from .onnx_in import load_onnx_model

        model = load_onnx_model(spec)
    else:
        file_part, sep, attr = spec.rpartition(":")
        if not sep or not file_part.endswith(".py") or not attr.isidentifier():
            raise ConfigError(
                f"model spec {spec!r} is not understood; use builtin:NAME (one of "
                f"{', '.join(sorted(BUILTIN_MODELS))}), path/to/file.py:factory, path/to/model.onnx or hf:DIR (a "
                "local Hugging Face model directory)."
            )
        model = _import_factory(file_part, attr)
    if weights is not None:
        try:
            load_weights(model, weights, trust_pickle=trust_pickle)
        except FileFormatError as exc:
            if not spec.startswith("builtin:") or data is None:
                raise
            raise FileFormatError(f"{exc} The model was built for the data's inputs {tuple(data.input_shape)} and "
                                  f"{data.num_classes} classes; the weights were made for another shape (pass the "
                                  "--data they were trained on).") from None
    check_finite(model, f"weights file '{weights}'" if weights is not None else f"model '{spec}'")
    return model.eval()
