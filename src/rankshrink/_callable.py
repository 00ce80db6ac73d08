"""Modules that are also the verb they are named after.

The public API reads ``rankshrink.plan(model, data, tolerance=...)``,
``rankshrink.calibrate(model, data)`` and ``rankshrink.finetune(model, data, epochs)``,
yet ``rankshrink.plan``, ``.calibrate`` and ``.finetune`` are also modules
(``from rankshrink.plan import Plan`` must keep working). Rebinding the package
attribute to the function would break ``rankshrink.plan.Plan``; instead the module
object itself is made callable, forwarding to the function.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types


def make_module_callable(module_name: str, function_path: str) -> None:
    """Make module ``module_name`` callable as ``function_path`` ('pkg.mod:function')."""
    target_module, _, target_name = function_path.partition(":")

    def target():
        return getattr(importlib.import_module(target_module), target_name)

    class CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return target()(*args, **kwargs)

        @property
        def __signature__(self):
            return inspect.signature(target())

    CallableModule.__doc__ = f"Calling this module calls {function_path.replace(':', '.')}."
    sys.modules[module_name].__class__ = CallableModule
