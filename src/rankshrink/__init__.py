"""rankshrink: shrink trained PyTorch networks with low-rank factorization; adapt them with LoRA.

One verb per stage of the data flow model + data → analyse → compress → apply →
finetune → export::

    import rankshrink as rs
    rs.analyze(model, example_batch)                        # costs, spectra, break-even ranks per layer
    result = rs.compress(model, splits, tolerance=0.01)     # or budget={"macs": 0.3}
    result.model, result.plan, result.summary()
    small = rs.apply(model, result.plan, data=splits)       # the same model again, from the plan
    tuned = rs.finetune(small, splits, 3, teacher=model).model
    rs.export(tuned, example_batch, "model.onnx")           # checked against PyTorch on ONNX Runtime
    rs.save(tuned, result.plan, "out/"); again = rs.load(MyModel, "out/")

Also: ``rs.count`` (params, bytes, MACs), ``rs.factorize`` (one layer), ``rs.calibrate``
(input statistics for activation fits), ``rs.Plan``, the method configs
(``rs.SVDConfig`` ...), ``rs.SearchConfig``, ``rs.TrainConfig``, ``rs.write_html_report(run_dir)``
(report.html from a run directory) and ``rankshrink.lora``.

Names are imported on first use, so ``import rankshrink`` (and the command line's
``--help``) does not pay for torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# Public name -> the module that defines it (imported when the name is first used).
_EXPORTS = {
    "analyze": "analysis", "Analysis": "analysis",
    "compress": "search", "CompressResult": "search", "SearchConfig": "search", "Budget": "search",
    "apply": "surgery", "save": "surgery", "load": "surgery",
    "finetune": "finetuning", "FinetuneResult": "finetuning",
    "export": "deploy",
    "calibrate": "calibration", "Calibration": "calibration",
    "count": "cost", "Cost": "cost", "ModelCost": "cost", "break_even_rank": "cost",
    "linear_break_even": "cost", "size_ratio": "cost", "speed_ratio": "cost",
    "factorize": "methods", "method_names": "methods", "MethodConfig": "methods", "SVDConfig": "methods",
    "SpatialConfig": "methods", "WeightConfig": "methods", "Tucker2Config": "methods", "CPConfig": "methods",
    "Factorized": "factorized",
    "factorizable_layers": "layers", "skipped_layers": "layers",
    "Plan": "plan",
    "TrainConfig": "train",
    "write_html_report": "html_report",
    "ConfigError": "errors", "DataError": "errors", "FileFormatError": "errors", "LayerError": "errors",
    "PlanError": "errors", "RankshrinkError": "errors", "UnsafeFileError": "errors",
}
_SUBPACKAGES = ("lora", "methods", "search", "deploy", "decompose", "models", "data", "files", "plan", "surgery",
                "cost", "calibration", "finetuning", "workflow", "train", "metrics", "errors", "fingerprint",
                "report", "analysis", "ranks", "layers", "factorized", "validation", "cli", "html_report",
                "report_data")

__all__ = ["__version__", "analyze", "Analysis", "compress", "CompressResult", "SearchConfig", "Budget", "apply",
    "save", "load", "finetune", "FinetuneResult", "export", "calibrate", "Calibration", "count", "Cost", "ModelCost",
    "break_even_rank", "linear_break_even", "size_ratio", "speed_ratio", "factorize", "method_names", "MethodConfig",
    "SVDConfig", "SpatialConfig", "WeightConfig", "Tucker2Config", "CPConfig", "Factorized", "factorizable_layers",
    "skipped_layers", "Plan", "TrainConfig", "ConfigError", "DataError", "FileFormatError", "LayerError",
    "PlanError", "RankshrinkError", "UnsafeFileError", "write_html_report", "lora"]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is not None:
        value = getattr(importlib.import_module(f".{module_name}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'rankshrink' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBPACKAGES))


if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from . import lora
    from .analysis import Analysis, analyze
    from .calibration import Calibration, calibrate
    from .cost import Cost, ModelCost, break_even_rank, count, linear_break_even, size_ratio, speed_ratio
    from .deploy import export
    from .errors import ConfigError, DataError, FileFormatError, LayerError, PlanError, RankshrinkError, UnsafeFileError
    from .factorized import Factorized
    from .finetuning import FinetuneResult, finetune
    from .html_report import write_html_report
    from .layers import factorizable_layers, skipped_layers
    from .methods import (
        CPConfig,
        MethodConfig,
        SpatialConfig,
        SVDConfig,
        Tucker2Config,
        WeightConfig,
        factorize,
        method_names,
    )
    from .plan import Plan
    from .search import Budget, CompressResult, SearchConfig, compress
    from .surgery import apply, load, save
    from .train import TrainConfig
