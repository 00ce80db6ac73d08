"""Factorization methods: one module each, found through one registry.

=========  ===================  ==================================================
module     replaces             factors
=========  ===================  ==================================================
``svd``     Linear               Linear(n→r) → Linear(r→m)
``embedding`` Embedding          Embedding(V→r) → Linear(r→d), as ALBERT's factorized embedding
``spatial`` Conv2d               (kh×1) conv → (1×kw) conv
``weight``  Conv1d, Conv2d       full-size conv S→R → 1×1 conv R→T
``tucker2`` Conv1d, Conv2d       1×1 → k-sized core → 1×1 (TensorLy underneath)
``cp``      Conv1d, Conv2d       1×1 → depthwise per axis → 1×1 (TensorLy underneath)
=========  ===================  ==================================================

See :mod:`.base` for what a method defines and how to add one: a new module here is found and
registered on import.
"""

import importlib
import pkgutil

from .base import (
    FITS,
    FactorizationWarning,
    Method,
    MethodConfig,
    bigger_than_dense,
    config_from_json,
    default_method,
    factorize,
    get_method,
    make_config,
    method_names,
    methods_for,
    register,
    select_options,
)

# Every module of this package but `base` is a method; importing it registers it (no list to keep up to date).
for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

from .cp import CPConfig  # noqa: E402  (the built-in methods' configs, re-exported for convenience)
from .embedding import EmbeddingConfig  # noqa: E402
from .spatial import SpatialConfig  # noqa: E402
from .svd import SVDConfig  # noqa: E402
from .tucker2 import Tucker2Config  # noqa: E402
from .weight import WeightConfig  # noqa: E402


def full_rank(geometry: dict, method: str):
    """The largest meaningful rank of ``method`` on a layer of ``geometry``."""
    return get_method(method).full_rank(geometry)


def normalize_rank(geometry: dict, method: str, rank, *, layer: str = "layer"):
    """``rank`` validated for ``method`` on a layer of ``geometry`` (the form the built block records)."""
    impl = get_method(method)
    impl.check_layer(geometry, layer)
    return impl.normalize_rank(geometry, rank, layer=layer)


__all__ = ["full_rank", "normalize_rank", "FITS", "Method", "MethodConfig", "config_from_json", "default_method",
           "factorize", "get_method", "make_config", "method_names", "methods_for", "register", "select_options",
           "SVDConfig", "EmbeddingConfig", "SpatialConfig", "WeightConfig", "Tucker2Config", "CPConfig",
           "FactorizationWarning",
           "bigger_than_dense"]
