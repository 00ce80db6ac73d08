"""Model surgery: the only code that rewrites module trees.

:func:`build` is the one way a model is made from a plan: it validates the whole plan,
copies the model (unless told otherwise) and puts a block at every planned layer, under
every name a shared module is reachable by. Who makes the blocks differs, nothing else:

* :func:`apply` -- factorizes each layer by its config (calibrating on ``data`` when an
  entry fits activations);
* :func:`empty_skeleton` / :func:`load` -- empty factor layers of the right shapes,
  then a saved state dict;
* the search's evaluator -- memoised blocks (:mod:`rankshrink.search.evaluate`);
* LoRA -- wrappers around layers (:func:`replace_layer`).

The input model is never modified unless ``inplace=True``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import FileFormatError, LayerError, PlanError
from .factorized import layer_bias, layer_geometry, unsupported_reason
from .files import atomic_write_json, load_tensors, prepare_output_dir, save_tensors, verify_output_set
from .layers import aliases, get_layer, tied_parameters
from .methods import MethodConfig, factorize, get_method
from .plan import Plan

__all__ = ["WEIGHTS_FILE", "PLAN_FILE", "replace_layer", "validate_plan", "build", "apply", "empty_skeleton",
           "save", "load", "load_state_dict_checked", "fold_batchnorm", "folding_preserves_outputs"]

WEIGHTS_FILE = "model.safetensors"
PLAN_FILE = "plan.json"

# Makes the block for one planned layer: (qualified name, dense module, config, normalised rank) -> block.
BlockMaker = Callable[[str, nn.Module, MethodConfig, Any], nn.Module]


def replace_layer(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at ``name`` (works through Sequential, ModuleList, ModuleDict, attributes)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.ModuleDict) or child in parent._modules:
        parent._modules[child] = new
    else:
        setattr(parent, child, new)


def validate_plan(model: nn.Module, plan: Plan) -> dict[str, Any]:
    """Check every entry against ``model`` before touching anything.

    Returns name -> normalised rank. Raises PlanError/LayerError naming the first
    bad layer: missing, not factorizable, wrong method, rank out of range, or tied.
    """
    if not isinstance(plan, Plan):
        raise PlanError(f"expected a rankshrink Plan, got {type(plan).__name__}; build one with "
                        "Plan.from_mapping(...).")
    ranks = {}
    seen: dict[int, str] = {}
    for name, entry in plan.items():
        module = get_layer(model, name)
        reason = unsupported_reason(module)
        if reason is not None:
            raise LayerError(f"layer '{name}' ({type(module).__name__}) cannot be factorized: {reason}.")
        if id(module) in seen:
            raise PlanError(f"layers '{seen[id(module)]}' and '{name}' are the same shared module; "
                            "list it once in the plan (it is replaced everywhere it is used).")
        seen[id(module)] = name
        tied = tied_parameters(model, module)
        if tied:
            raise LayerError(f"layer '{name}' shares its weights with {', '.join(tied)} (tied weights); "
                             "factorizing it alone would silently untie them. Remove it from the plan.")
        geometry = layer_geometry(module)
        method = get_method(entry.method)
        method.check_layer(geometry, f"layer '{name}'")
        ranks[name] = method.normalize_rank(geometry, entry.rank, layer=f"layer '{name}'")
    return ranks


def fold_batchnorm(model: nn.Module, pairs: list[tuple[str, str]] | None = None, *,
                   inplace: bool = False) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with each BatchNorm of ``pairs`` folded into its layer.

    ``pairs``: (Linear/Conv layer, BatchNorm) names; None finds them
    (:func:`rankshrink.layers.batchnorm_folds`). The layer's weight and bias take the BatchNorm's
    eval-mode affine map, ``W' = W·γ/√(var+ε)`` and ``b' = (b − mean)·γ/√(var+ε) + β`` (computed in
    float64), and the BatchNorm becomes an ``nn.Identity``, so in eval mode the model computes the
    same function (to rounding) with one layer fewer. A pair whose BatchNorm is already an
    Identity is skipped (folding twice changes nothing).
    """
    from .layers import FOLDABLE_TYPES, batchnorm_folds

    if pairs is None:
        pairs = batchnorm_folds(model)
    target = model if inplace else copy.deepcopy(model)
    where = aliases(target)
    for layer_name, bn_name in pairs:
        bn = get_layer(target, bn_name)
        if isinstance(bn, nn.Identity):
            continue
        layer = get_layer(target, layer_name)
        if type(layer) not in FOLDABLE_TYPES or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise PlanError(f"cannot fold '{bn_name}' ({type(bn).__name__}) into '{layer_name}' "
                            f"({type(layer).__name__}): folding needs a Linear/Conv followed by a BatchNorm.")
        running_mean, running_var = bn.running_mean, bn.running_var
        weight = layer.weight
        assert isinstance(weight, torch.Tensor)
        if not isinstance(running_mean, torch.Tensor) or not isinstance(running_var, torch.Tensor) \
                or running_mean.numel() != weight.shape[0]:
            raise PlanError(f"cannot fold '{bn_name}' into '{layer_name}': it needs running statistics for "
                            f"{weight.shape[0]} channels.")
        with torch.no_grad():
            gamma, beta = bn.weight, bn.bias
            scale = 1.0 / torch.sqrt(running_var.double() + float(bn.eps))
            if isinstance(gamma, torch.Tensor):
                scale = scale * gamma.double()
            shift = -running_mean.double() * scale
            if isinstance(beta, torch.Tensor):
                shift = shift + beta.double()
            bias = layer_bias(layer)
            new_bias = shift if bias is None else shift + scale * bias.double()
            weight.copy_((weight.double() * scale.view(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype))
            if bias is None:
                layer.bias = nn.Parameter(new_bias.to(weight.dtype), requires_grad=weight.requires_grad)
            else:
                bias.copy_(new_bias.to(bias.dtype))
        for alias in where[id(bn)]:
            replace_layer(target, alias, nn.Identity())
    return target


def folding_preserves_outputs(model: nn.Module, folded: nn.Module, inputs: Any, *, rtol: float = 1e-4) -> bool:
    """Whether ``folded`` computes what ``model`` does on ``inputs`` (eval mode), to ``rtol`` of the largest output.

    The check behind folding a model whose graph could not be traced: its BatchNorm layers were
    paired with the layer before them in an ``nn.Sequential``, which its forward might not follow.
    """
    from .inputs import call_model, output_tensor, to_model
    from .metrics import eval_mode

    with torch.no_grad(), eval_mode(model, folded):
        try:
            x = output_tensor(call_model(model, to_model(inputs, model))).double()
            y = output_tensor(call_model(folded, to_model(inputs, folded))).double()
        except Exception:  # the model fails on these inputs anyway; the caller reports that properly
            return True
    return x.shape == y.shape and bool((x - y).abs().max() <= rtol * max(1.0, float(x.abs().max())))


def build(model: nn.Module, plan: Plan, make_block: BlockMaker, *, inplace: bool = False,
          progress: bool = False, share_weights: bool = False) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with ``make_block``'s block at every layer of ``plan``.

    The plan's BatchNorm folds come first (:func:`fold_batchnorm`), then the whole plan is
    validated; a shared module is replaced everywhere it is used. ``make_block`` receives the
    layer of the *original* model (folded, when the plan folds it), never modified.
    ``share_weights``: the copy's module tree is new but its parameters and buffers are the
    original's tensors (nothing is copied: for evaluating plans of a large model; do not train it).
    """
    if plan.fold_batchnorm and any(not isinstance(get_layer(model, bn), nn.Identity)
                                   for _, bn in plan.fold_batchnorm):
        model = fold_batchnorm(model, plan.fold_batchnorm, inplace=inplace)
        inplace = True  # ``model`` is now the copy (or the caller's own model, folded in place)
    ranks = validate_plan(model, plan)
    if inplace:
        target = model
    elif share_weights:
        shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
        target = copy.deepcopy(model, shared)
    else:
        # The weights of the layers about to be replaced are not copied only to be dropped (for a large
        # model half of it): the copy points at the original's, until make_block's block takes their place.
        target = copy.deepcopy(model, _replaced_tensors(model, plan))
    where = aliases(target)
    items: Any = list(plan.items())
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(items, desc="factorizing", unit="layer")
    for name, entry in items:
        source = model.get_submodule(name)
        module = target.get_submodule(name)
        block = make_block(name, source, entry, ranks[name])
        for alias in where[id(module)]:  # a shared module is replaced everywhere it is used
            replace_layer(target, alias, block)
    return target


def _replaced_tensors(model: nn.Module, plan: Plan) -> dict[int, torch.Tensor]:
    """id -> tensor of the parameters and buffers that only the layers of ``plan`` hold (a deepcopy memo)."""
    planned = {id(model.get_submodule(name)) for name, _ in plan.items()}
    kept: set[int] = set()
    owned: dict[int, torch.Tensor] = {}
    for module in model.modules():
        tensors = (*module.parameters(recurse=False), *module.buffers(recurse=False))
        if id(module) in planned:
            owned.update((id(t), t) for t in tensors)
        else:
            kept.update(id(t) for t in tensors)
    return {key: tensor for key, tensor in owned.items() if key not in kept}


def empty_skeleton(model: nn.Module, plan: Plan, *, inplace: bool = False) -> nn.Module:
    """``model`` with the planned layers replaced by empty factor layers of the right shapes."""
    def empty(name: str, module: nn.Module, entry: MethodConfig, rank: Any) -> nn.Module:
        weight = module.weight
        return get_method(entry.method).build(layer_geometry(module), rank, dtype=weight.dtype, device=weight.device)

    return build(model, plan, empty, inplace=inplace)


def apply(model: nn.Module, plan: Plan | dict, *, data: Any = None, calibration=None, fit: str | None = None,
          inplace: bool = False, progress: bool = False, example_input: Any = None) -> nn.Module:
    """A copy of ``model`` with every layer in ``plan`` replaced by its factorization.

    The whole plan is validated before any work; the plan's BatchNorm folds come first.
    Entries that fit activations need the layers' input statistics: ``calibration`` (from
    :func:`rankshrink.calibrate` on this model), or ``data`` to calibrate on (a
    :class:`~rankshrink.data.Splits`, whose training split is used, or a data set), drawn as
    the plan's ``calibration`` settings say, so the result equals the model the plan was found
    with. ``fit`` ('weights' or 'activations') re-fits every entry that way instead of as
    planned. ``example_input`` (one batch; else the first sample of ``data``) sizes the layers,
    so an entry that costs more MACs than its dense layer is warned about (more parameters are
    always warned about). With ``inplace=True`` the model itself is changed (for models too
    large to copy).
    """
    from .models.weights import check_finite

    if isinstance(plan, dict):
        plan = Plan.from_mapping(plan)
    if fit is not None:
        plan = plan.with_fit(fit)
    check_finite(model)  # no values (meta), integer/complex weights or NaN: refused, never cast or factorized
    if plan.fold_batchnorm:
        model = fold_batchnorm(model, plan.fold_batchnorm, inplace=inplace)
        inplace = True  # the folded copy (or the caller's model, folded in place)
    validate_plan(model, plan)
    fitted = plan.activation_layers
    if fitted and calibration is None:
        if data is None:
            shown = ", ".join(fitted[:4]) + (" ..." if len(fitted) > 4 else "")
            raise PlanError(f"the plan fits {len(fitted)} layer(s) to activations ({shown}), which needs calibration "
                            "data: pass data= (CLI: --data SPEC) to calibrate on, or re-fit them to the weights "
                            "(fit='weights'; CLI: --fit weights).")
        calibration = calibrate_for_plan(model, plan, data, progress=progress)
    layer_stats: dict[str, object] = {}
    if fitted:
        names = aliases(model)
        for name in fitted:
            module = model.get_submodule(name)
            found = next((calibration.get(alias) for alias in [name, *names.get(id(module), [])]
                          if calibration.get(alias) is not None), None)
            if found is None:
                calibration[name]  # raises DataError naming the layer and what was calibrated
            layer_stats[name] = found
    sizes = _input_sizes(model, plan, example_input, data)

    def factorized(name: str, module: nn.Module, entry: MethodConfig, rank: Any) -> nn.Module:
        return factorize(module, entry, name=f"layer '{name}'", input_stats=layer_stats.get(name),
                         input_size=sizes.get(name))

    return build(model, plan, factorized, inplace=inplace, progress=progress)


def _input_sizes(model: nn.Module, plan: Plan, example_input: Any, data: Any) -> dict[str, Any]:
    """Each planned layer's input size (and calls) on one example, or {} when there is nothing to run."""
    if example_input is None and data is not None:
        from .data import Splits, as_dataset, first_batch

        try:
            source = data.val if isinstance(data, Splits) else as_dataset(data)
            example_input = first_batch(source)[0]
        except Exception:  # the sizes only decide a warning; calibration reports bad data itself
            return {}
    if example_input is None or not len(plan):
        return {}
    from .cost import count

    costs = count(model, example_input)
    return {row.name: (row.input_size, row.calls) for row in costs.layers if row.name in plan}


def calibrate_for_plan(model: nn.Module, plan: Plan, data: Any, *, progress: bool = False):
    """The input statistics of the plan's activation-fitted layers, drawn as the plan records."""
    import warnings

    from .calibration import CalibrationWarning, calibrate
    from .data import Splits

    settings = plan.calibration_settings()
    dataset = data.train if isinstance(data, Splits) else data
    recorded = settings.get("data")
    if recorded:
        from .fingerprint import dataset_fingerprint

        if dataset_fingerprint(dataset) != recorded:
            warnings.warn("the calibration data differs from the data the plan's activation fits were made on; "
                          "the factors will differ from the ones the plan was found with.", UserWarning,
                          stacklevel=3)
    with warnings.catch_warnings():
        # The search calibrated without these warnings too; small layers are expected to be under-sampled.
        warnings.filterwarnings("ignore", category=CalibrationWarning, message=".*input vectors.*")
        return calibrate(model, dataset, layers=plan.activation_layers, samples=settings["samples"],
                         batch_size=settings["batch_size"], seed=settings["seed"], progress=progress)


def save(model: nn.Module, plan: Plan, directory: str | os.PathLike, *, force: bool = False,
         extra_files: dict[str, object] | None = None) -> Path:
    """Write ``model.safetensors`` and ``plan.json`` (each atomically) into ``directory``."""
    directory = prepare_output_dir(directory, force=force)
    state = model.state_dict()
    save_tensors(directory / WEIGHTS_FILE, state, metadata={"format": "rankshrink-model"})
    plan.save(directory / PLAN_FILE)
    for filename, content in (extra_files or {}).items():
        atomic_write_json(directory / filename, content)
    return directory


def load(factory: Callable[[], nn.Module] | nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Rebuild a compressed model saved by :func:`save` on a fresh instance of its class.

    ``factory`` is the user's model class (or any zero-argument callable returning
    the uncompressed model, or such a model itself, which is not modified). The
    planned layers are replaced by empty factor layers, then all weights load strictly.
    """
    directory = Path(directory)
    # A set written by files.output_set records checksums: refuse a mix of two runs' files.
    verify_output_set(directory, names=[PLAN_FILE, WEIGHTS_FILE])
    plan = Plan.load(directory / PLAN_FILE) if (directory / PLAN_FILE).exists() else None
    if plan is None:
        raise FileFormatError(f"'{directory}' has no {PLAN_FILE}; it is not a model saved by rankshrink.save().")
    base = copy.deepcopy(factory) if isinstance(factory, nn.Module) else factory()
    if not isinstance(base, nn.Module):
        raise PlanError(f"the factory returned {type(base).__name__}, not an nn.Module.")
    skeleton = empty_skeleton(base, plan, inplace=True)
    state = load_tensors(directory / WEIGHTS_FILE)
    load_state_dict_checked(skeleton, state, directory / WEIGHTS_FILE)
    return skeleton.eval()


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """``load_state_dict(strict=True)`` with an error naming the first mismatching key/shape/kind of dtype."""
    from .models.weights import dtype_kind as _dtype_kind

    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        detail = (f"missing key '{missing[0]}'" if missing else "") + (
            ("; " if missing else "") + f"unexpected key '{unexpected[0]}'" if unexpected else "")
        raise FileFormatError(f"'{source}' does not match the model: {detail} "
                              f"({len(missing)} missing, {len(unexpected)} unexpected).")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise FileFormatError(f"'{source}' does not match the model: '{key}' has shape "
                                  f"{tuple(state[key].shape)} in the file but {tuple(tensor.shape)} in the model.")
        if _dtype_kind(state[key].dtype) != _dtype_kind(tensor.dtype):  # load_state_dict would cast silently
            raise FileFormatError(f"'{source}': '{key}' holds {_dtype_kind(state[key].dtype)} values "
                                  f"({state[key].dtype}) but the model's is {_dtype_kind(tensor.dtype)} "
                                  f"({tensor.dtype}); rankshrink does not cast weights between kinds.")
    model.load_state_dict(state, strict=True)
