"""Which layers' outputs reach the model's output: a layer nothing downstream uses is not worth searching.

A Hugging Face encoder computes a pooler that a mean-pooled sentence embedding never looks at; a
model may carry a head it does not call. Such a layer can be factorized to any rank without changing
a single output, so a search would "compress" it for free while its parameters stay in the model.
:func:`unreached_layers` finds them with one forward and backward pass of one example: every layer's
output gets a zero added that requires a gradient, and the layers whose zero receives no gradient
from the model's output representation (:func:`rankshrink.outputs.representation`, what the metrics
compare) do not reach it.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

__all__ = ["unreached_layers", "UNREACHED_REASON"]

UNREACHED_REASON = "its output does not reach the model's output (no gradient path from the output to it)"


def unreached_layers(model: nn.Module, example_input: Any, names: Iterable[str]) -> dict[str, str]:
    """``{name: reason}`` for the layers among ``names`` whose output does not reach the model's output.

    Runs ``model`` once (eval mode, gradients on) on ``example_input``. A model whose output does not
    depend on anything differentiable (or that fails here) reports nothing: nothing is left out then.
    """
    from .inputs import call_model, hookable, to_model
    from .metrics import eval_mode
    from .outputs import representation

    names = list(names)
    zeros: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = []

    def hook_for(name: str):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                zero = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
                zeros[name].append(zero)
                return output + zero
            return None
        return hook

    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(hook_for(name)))
    try:
        with torch.enable_grad(), eval_mode(model), hookable():
            inputs = to_model(example_input, model)
            rep = representation(call_model(model, inputs), inputs)
            leaves = [zero for name in names for zero in zeros[name]]
            if not leaves or not isinstance(rep, torch.Tensor) or not rep.requires_grad:
                return {}
            grads = torch.autograd.grad(rep.float().sum(), leaves, allow_unused=True)
    except Exception:  # reachability only narrows the search; a model that cannot run backward keeps every layer
        return {}
    finally:
        for handle in handles:
            handle.remove()
    reached: dict[str, bool] = {name: False for name in names}
    index = 0
    for name in names:
        for _ in zeros[name]:
            reached[name] = reached[name] or grads[index] is not None
            index += 1
    # A layer never called on the example is not "unreached": the cost model already leaves it out.
    return {name: UNREACHED_REASON for name in names if zeros[name] and not reached[name]}
