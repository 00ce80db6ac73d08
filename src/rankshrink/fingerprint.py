"""Content fingerprints (sha256) of tensors, modules, data sets and plain data.

Every cache and checkpoint key in rankshrink is built from these, never from a name a
user writes: changing one weight, one sample or one option changes the key.

* :func:`update_with_tensor` -- a tensor's shape, dtype and raw bytes into a running digest.
* :func:`state_fingerprint` / :func:`module_fingerprint` -- a state dict (in order, or
  sorted by name) or a module's state dict.
* :func:`dataset_fingerprint` -- every item of a map-style data set, streamed: the
  tensors of a ``TensorDataset`` or an ``InputDataset`` (or Subsets of them) are hashed
  directly, any other data set item by item (inputs and labels, nested tuples/lists/dicts
  of tensors); very large data sets by their size plus a deterministic sample of rows.
* :func:`object_fingerprint` -- canonical JSON of plain data (options, configs).
* :func:`code_fingerprint` -- the code a module runs: every class in its tree by qualified name and
  a hash of its source (plus an instance's own ``forward``, when one was assigned), so the same
  weights behind another wrapper or a changed ``forward()`` get other keys.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
from typing import Any, Iterable, Mapping

import torch

__all__ = ["update_with_tensor", "state_fingerprint", "module_fingerprint", "dataset_fingerprint",
           "object_fingerprint", "jsonable", "code_fingerprint", "source_hash"]


def update_with_tensor(digest: Any, tensor: torch.Tensor) -> None:
    """Feed ``tensor``'s shape, dtype and bytes to ``digest`` (a hashlib object)."""
    t = tensor.detach()
    if t.device.type == "meta":
        digest.update(f"meta|{tuple(t.shape)}|{t.dtype}|".encode())
        return
    t = t.cpu().contiguous()
    digest.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if t.numel():
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def state_fingerprint(state: Mapping[str, torch.Tensor], *, sort: bool = False, salt: bytes = b"") -> str:
    """sha256 over a state dict's names and tensors (in its order, or sorted by name)."""
    digest = hashlib.sha256(salt)
    items: Iterable = sorted(state.items()) if sort else state.items()
    for name, tensor in items:
        digest.update(f"{name}|".encode())
        update_with_tensor(digest, tensor)
    return digest.hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of ``module.state_dict()`` (names, shapes, dtypes, bytes, in order)."""
    return state_fingerprint(module.state_dict(), salt=b"rankshrink-module-v2")


@functools.lru_cache(maxsize=4096)
def _class_source_hash(cls: type) -> str:
    return source_hash(cls)


def source_hash(obj: Any) -> str:
    """sha256 of ``obj``'s source code (a class, function or method); of its qualified name when the
    source cannot be read (a built-in, a class defined in a REPL)."""
    try:
        text = inspect.getsource(obj)
    except (OSError, TypeError):
        text = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def code_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of the code ``module`` runs: each class in its tree (qualified name and source hash, in tree
    order), and the source of any ``forward`` assigned to an instance. Weights are not included."""
    digest = hashlib.sha256(b"rankshrink-code-v1")
    seen: set[type] = set()
    for name, sub in module.named_modules():
        cls = type(sub)
        if cls not in seen:
            seen.add(cls)
            digest.update(f"{cls.__module__}.{cls.__qualname__}:{_class_source_hash(cls)}|".encode())  # type: ignore[arg-type]
        own = sub.__dict__.get("forward")
        if own is not None:
            digest.update(f"{name}.forward:{source_hash(own)}|".encode())
    return digest.hexdigest()


def _update_with_item(digest: Any, item: Any) -> None:
    if isinstance(item, torch.Tensor):
        update_with_tensor(digest, item)
    elif isinstance(item, Mapping):
        digest.update(b"{")
        for key in sorted(item, key=str):
            digest.update(f"{key}:".encode())
            _update_with_item(digest, item[key])
        digest.update(b"}")
    elif isinstance(item, (tuple, list)):
        digest.update(b"(")
        for part in item:
            _update_with_item(digest, part)
        digest.update(b")")
    else:
        try:
            import numpy as np

            if isinstance(item, np.ndarray):
                update_with_tensor(digest, torch.from_numpy(np.ascontiguousarray(item)))
                return
        except ImportError:  # pragma: no cover - numpy is a dependency
            pass
        digest.update(repr(item).encode())


# Above these sizes a data set is fingerprinted by its size plus a deterministic sample of rows
# (hashing gigabytes on every run would cost more than the caches save).
FULL_HASH_MAX_BYTES = 1 << 31
FULL_HASH_MAX_ITEMS = 50_000
SAMPLED_ROWS = 10_000


def _sample_rows(n: int) -> torch.Tensor:
    """A deterministic spread of rows: evenly spaced, first and last included."""
    return torch.unique(torch.linspace(0, n - 1, SAMPLED_ROWS).round().long())


def _tensor_content(dataset: Any) -> tuple[list[tuple[str, torch.Tensor]], torch.Tensor | None] | None:
    """(named tensors of the base data set, index map of Subsets over it) for tensor-backed data sets."""
    from torch.utils.data import Subset, TensorDataset

    index = None
    while isinstance(dataset, Subset):
        here = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        index = here if index is None else here[index]
        dataset = dataset.dataset
    if isinstance(dataset, TensorDataset):
        return [(str(i), t) for i, t in enumerate(dataset.tensors)], index
    content = getattr(dataset, "content", None)  # rankshrink.data.InputDataset
    if callable(content):
        return list(content()), index
    return None


def dataset_fingerprint(dataset: Any) -> str:
    """sha256 over every sample of ``dataset`` (content, not its type or length alone).

    Tensor-backed data sets (TensorDataset, rankshrink's InputDataset, Subsets of them) are
    hashed tensor by tensor; other data sets item by item. Data sets above 2 GiB (tensor-backed)
    or 50,000 items (others) are hashed by their size plus 10,000 evenly spaced samples.
    """
    digest = hashlib.sha256(b"rankshrink-dataset-v3")
    found = _tensor_content(dataset)
    if found is not None:
        named, index = found
        n = len(index) if index is not None else (len(named[0][1]) if named else 0)
        nbytes = sum(t.numel() * t.element_size() for _, t in named)
        rows = index
        if nbytes > FULL_HASH_MAX_BYTES and n > SAMPLED_ROWS:
            sample = _sample_rows(n)
            rows = sample if index is None else index[sample]
            digest.update(f"sampled n={n}|".encode())
        for name, tensor in named:
            digest.update(f"{name}|".encode())
            update_with_tensor(digest, tensor if rows is None else tensor[rows])
        return digest.hexdigest()
    n = len(dataset)
    digest.update(f"n={n}|".encode())
    positions: Any = range(n)
    if n > FULL_HASH_MAX_ITEMS:
        positions = _sample_rows(n).tolist()
        digest.update(b"sampled|")
    for i in positions:
        _update_with_item(digest, dataset[i])
    return digest.hexdigest()


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON data: mappings sorted by key, tuples as lists, unknown objects by repr."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def object_fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of plain data (see :func:`jsonable`)."""
    return hashlib.sha256(json.dumps(jsonable(obj), sort_keys=True).encode()).hexdigest()
