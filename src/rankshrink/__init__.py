"""rankshrink: shrink trained PyTorch networks with low-rank factorization; adapt them with LoRA.

The public API follows the data flow model + data → analyse → plan → apply →
fine-tune → export/report::

    import rankshrink as rs
    costs = rs.count(model, example_batch)                 # params, bytes, MACs per layer
    plan = rs.Plan.from_mapping({"classifier.1": ("svd", 16)})
    small = rs.apply(model, plan)                          # a new model; `model` is untouched
    rs.save(small, plan, "out/")                           # safetensors + plan.json
    again = rs.load(MyModel, "out/")
    found = rs.plan(model, splits, tolerance=0.01)         # rank search (or budget={"macs": 0.3})
    cal = rs.calibrate(model, splits)                      # input statistics for data-aware factors
    tuned = rs.finetune(found.compressed_model(), splits, 3, teacher=model)

``rankshrink.plan``, ``.calibrate`` and ``.finetune`` are modules that can be called
like the function they are named after (``from rankshrink.plan import Plan`` works too).
"""

from . import calibrate, finetune, lora, plan  # modules that are also callable: rankshrink.plan(...)
from .cost import Cost, ModelCost, break_even_rank, count, linear_break_even, size_ratio, speed_ratio
from .errors import (ConfigError, DataError, FileFormatError, LayerError, PlanError, RankshrinkError,
                     UnsafeFileError)
from .factorized import Factorized, factorize
from .plan import LayerPlan, Plan
from .search import plan as search_plan
from .surgery import apply, factorizable_layers, load, save, skipped_layers

__version__ = "0.1.0"

__all__ = [
    "plan", "search_plan", "calibrate", "finetune", "lora",
    "apply", "break_even_rank", "count", "factorizable_layers", "factorize", "linear_break_even", "load",
    "save", "size_ratio", "skipped_layers", "speed_ratio",
    "Cost", "Factorized", "LayerPlan", "ModelCost", "Plan",
    "ConfigError", "DataError", "FileFormatError", "LayerError", "PlanError", "RankshrinkError",
    "UnsafeFileError",
]
