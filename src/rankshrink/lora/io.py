"""Adapter files: the Hugging Face PEFT LoRA layout, plus a base-model fingerprint.

A saved adapter is a directory with

* ``adapter_model.safetensors`` - only the adapter weights, under PEFT's names:
  ``base_model.model.<layer>.lora_A.weight`` (r, in[, k…]) and
  ``base_model.model.<layer>.lora_B.weight`` (out, r[, 1…]);
* ``adapter_config.json`` - PEFT's ``LoraConfig`` fields (``peft_type: "LORA"``, ``r``,
  ``lora_alpha``, ``target_modules``, ``rank_pattern``/``alpha_pattern`` where layers
  differ, ...) and a ``rankshrink`` section (PEFT ignores unknown keys) with the
  fingerprint of the base layers the adapter was trained on.

PiSSA adapters (whose base layer keeps a residual) are saved as plain LoRA adapters
of rank 2r onto the *original* base: ``A' = [A; A₀]``, ``B' = [B, −B₀]``, so that
``W_orig + s·B'A' = W_residual + s·B·A`` (PEFT's PiSSA→LoRA conversion).
Both files are written atomically.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import FileFormatError, LayerError
from ..files import atomic_write_json, load_tensors, read_json, save_tensors
from ..surgery import replace_layer
from .config import LoraConfig, alpha_for
from .layer import LoraLayerBase, layer_digest, unsupported_reason, wrap_layer
from .model import _layers_with, _ShapeProbe, fingerprint, mark_only_adapters_trainable, set_adapter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
FORMAT_VERSION = 1
_KEY = re.compile(r"^base_model\.model\.(?P<layer>.+)\.lora_(?P<ab>[AB])\.weight$")


def peft_key(layer_name: str, which: str) -> str:
    """PEFT's tensor name for ``which`` ('A' or 'B') of layer ``layer_name``."""
    return f"{KEY_PREFIX}{layer_name}.lora_{which}.weight"


def adapter_tensors(model: nn.Module, name: str = "default") -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """PEFT-named tensors of adapter ``name`` and per-layer facts (r, alpha, scaling)."""
    tensors: dict[str, torch.Tensor] = {}
    facts: dict[str, dict] = {}
    for layer_name, w in sorted(_layers_with(model, name).items()):
        A, B = w.lora_A[name].detach(), w.lora_B[name].detach()
        r, scaling, rslora = w.r[name], w.scaling[name], w.use_rslora[name]
        converted = w.lora_init.has(name)
        if converted:
            A0, B0 = w.lora_init.get(name)
            A, B = torch.cat([A, A0], 0), torch.cat([B, -B0], 1)
            r = 2 * r
        tensors[peft_key(layer_name, "A")] = A
        tensors[peft_key(layer_name, "B")] = B
        facts[layer_name] = {"r": r, "alpha": alpha_for(r, scaling, rslora), "use_rslora": rslora,
                             "dropout": w.lora_dropout[name], "init": w.init_mode[name], "pissa": converted,
                             "type": w.geometry["type"], "weight_shape": list(w.weight_shape),
                             "digest": w.base_digest}
    return tensors, facts


def save_adapter(model: nn.Module, directory: str | Path, name: str = "default", *,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write adapter ``name`` of ``model`` to ``directory`` (created if needed); returns it.

    Only the two adapter files are written (replaced if present); nothing else in the
    directory is touched.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileFormatError(f"adapter output '{directory}' exists and is not a directory; choose another path.")
    tensors, facts = adapter_tensors(model, name)
    layers = sorted(facts)
    first = facts[layers[0]]
    r0, alpha0 = first["r"], first["alpha"]
    rslora = {f["use_rslora"] for f in facts.values()}
    if len(rslora) != 1:  # cannot happen through the public API; keep the file honest
        raise LayerError(f"adapter '{name}' mixes rsLoRA and plain scaling across layers; it cannot be saved in "
                         "PEFT's format.")
    config = LoraConfig(
        r=r0, lora_alpha=_clean_number(alpha0), target_modules=layers, lora_dropout=first["dropout"],
        use_rslora=rslora.pop(),
        init_lora_weights=True if any(f["pissa"] for f in facts.values()) else _init_for_json(first["init"]),
        rank_pattern={k: f["r"] for k, f in facts.items() if f["r"] != r0},
        alpha_pattern={k: _clean_number(f["alpha"]) for k, f in facts.items()
                       if abs(f["alpha"] - alpha0) > 1e-12 * max(1.0, abs(alpha0))},
    )
    data = config.to_peft_dict(layers)
    data["base_model_name_or_path"] = base_model_name_or_path
    data["rankshrink"] = {
        "format_version": FORMAT_VERSION,
        "adapter_name": name,
        "fingerprint": fingerprint(model, layers),
        "pissa_converted": any(f["pissa"] for f in facts.values()),
        "layers": {k: {"type": f["type"], "weight_shape": f["weight_shape"], "digest": f["digest"]}
                   for k, f in facts.items()},
    }
    save_tensors(directory / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    atomic_write_json(directory / CONFIG_NAME, data)
    return directory


def _clean_number(x: float):
    return int(round(x)) if abs(x - round(x)) < 1e-9 else float(x)


def _init_for_json(init: Any):
    return True if init in (True, "kaiming") else init


def read_adapter(directory: str | Path) -> tuple[LoraConfig, dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Parse an adapter directory: (config, raw JSON, {layer: {'A': tensor, 'B': tensor}})."""
    from ..files import path_kind, require_dir, require_file

    directory = require_dir(directory, "adapter directory", hint="Pass the --out directory of 'rankshrink lora "
                                                                   "train' (or a PEFT adapter directory).")
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if path_kind(config_path) == "missing":
        raise FileFormatError(f"'{directory}' has no {CONFIG_NAME}; it is not a saved LoRA adapter.")
    require_file(config_path, "adapter config")
    if path_kind(weights_path) not in ("missing", "file"):
        require_file(weights_path, "adapter weights file")
    if not weights_path.is_file():
        extra = " (adapter_model.bin pickles are not read; convert to safetensors)" \
            if (directory / "adapter_model.bin").exists() else ""
        raise FileFormatError(f"'{directory}' has no {WEIGHTS_NAME}{extra}; it is not a complete LoRA adapter.")
    raw = read_json(config_path, what="adapter config")
    config = LoraConfig.from_dict(raw, source=str(config_path))
    tensors = load_tensors(weights_path)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise FileFormatError(
                f"'{weights_path}' holds tensor '{key}', which is not a LoRA weight named like "
                "'base_model.model.<layer>.lora_A.weight'; rankshrink loads plain LoRA adapters only "
                "(no modules_to_save, no lora bias)."
            )
        if not tensor.dtype.is_floating_point:
            raise FileFormatError(f"'{weights_path}': tensor '{key}' is {tensor.dtype}, not floating point; an "
                                  "adapter holds real-valued weights, and rankshrink does not cast them.")
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:  # merged in, these would spread NaN/Inf through the whole layer
            raise FileFormatError(f"'{weights_path}': tensor '{key}' holds {bad} NaN/Inf value(s) of {tensor.numel()}; "
                                  "the adapter is damaged or its training diverged. Retrain it (lower --lr).")
        layers.setdefault(match["layer"], {})[match["ab"]] = tensor
    for layer, pair in layers.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise FileFormatError(f"'{weights_path}' has no {missing}.weight for layer '{layer}'; the file is "
                                  "incomplete.")
    if not layers:
        raise FileFormatError(f"'{weights_path}' holds no LoRA weights.")
    return config, raw, layers


def load_adapter(model: nn.Module, directory: str | Path, name: str = "default", *, inplace: bool = False,
                 check_fingerprint: bool = True, activate: bool = True, trainable: bool = False) -> nn.Module:
    """Add the adapter saved in ``directory`` to ``model`` under ``name``.

    Returns a copy of ``model`` unless ``inplace``. Every layer the file names must
    exist with matching shapes, and (for files written by rankshrink, unless
    ``check_fingerprint=False``) hold the same weights the adapter was trained on.
    Base parameters are frozen; the adapter is trainable only with ``trainable=True``.
    """
    directory = Path(directory)
    config, raw, layers = read_adapter(directory)
    weights_path = directory / WEIGHTS_NAME
    plans = []
    for layer_name in sorted(layers):
        A, B = layers[layer_name]["A"], layers[layer_name]["B"]
        try:
            module = model.get_submodule(layer_name)
        except AttributeError:
            raise FileFormatError(
                f"adapter '{directory}' has weights for layer '{layer_name}', which {type(model).__name__} does not "
                "have; load it onto the model architecture it was trained for."
            ) from None
        reason = unsupported_reason(module)
        if reason is not None:
            raise FileFormatError(f"adapter '{directory}' targets layer '{layer_name}', which cannot take an adapter "
                                  f"in this model: {reason}.")
        probe = module if isinstance(module, LoraLayerBase) else _ShapeProbe(module)
        r = A.shape[0] if A.dim() >= 2 else -1
        want_A, want_B = tuple(probe.a_shape(max(r, 1))), tuple(probe.b_shape(max(r, 1)))
        if tuple(A.shape) != want_A or tuple(B.shape) != want_B:
            raise FileFormatError(
                f"adapter '{weights_path}' does not fit layer '{layer_name}' of this model: lora_A is "
                f"{tuple(A.shape)} and lora_B {tuple(B.shape)}, but a rank-{r} adapter for this layer (weight shape "
                f"{tuple(probe.weight_shape)}) needs {want_A} and {want_B}. The adapter was trained on a base "
                "model with different layer sizes; load it onto that base."
            )
        r_cfg = config.rank_for(layer_name)
        if r_cfg != r:
            raise FileFormatError(f"'{weights_path}': layer '{layer_name}' has rank {r} but the config says r={r_cfg} "
                                  "(check r/rank_pattern in adapter_config.json).")
        if isinstance(module, LoraLayerBase) and name in module.lora_A:
            raise LayerError(f"layer '{layer_name}' already has an adapter named '{name}'; load under another "
                             "name= or delete_adapter() it first.")
        plans.append((layer_name, A, B, r))
    meta = raw.get("rankshrink") if isinstance(raw.get("rankshrink"), dict) else None
    if check_fingerprint and meta and meta.get("fingerprint"):
        _check_fingerprint(model, directory, meta, sorted(layers))
    if not inplace:
        model = copy.deepcopy(model)
    for layer_name, A, B, r in plans:
        module = model.get_submodule(layer_name)
        wrapper = wrap_layer(module, layer_name=layer_name)
        dtype = wrapper._base_weight_param().dtype
        wrapper.add_adapter_from(name, A.to(dtype), B.to(dtype), config.scaling_for(layer_name), r=r,
                                 lora_alpha=config.alpha_for(layer_name), use_rslora=config.use_rslora,
                                 lora_dropout=config.lora_dropout)
        if wrapper is not module:
            replace_layer(model, layer_name, wrapper)
    if activate:
        set_adapter(model, name)
    if trainable:
        mark_only_adapters_trainable(model, [name])
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def _check_fingerprint(model: nn.Module, directory: Path, meta: dict, layer_names: list[str]) -> None:
    have = fingerprint(model, layer_names)
    if have == meta["fingerprint"]:
        return
    recorded = meta.get("layers", {})
    differing = []
    for layer_name in layer_names:
        module = model.get_submodule(layer_name)
        digest = module.base_digest if isinstance(module, LoraLayerBase) else layer_digest(module)
        if recorded.get(layer_name, {}).get("digest") != digest:
            differing.append(layer_name)
    which = ", ".join(differing) if differing else ", ".join(layer_names)
    raise FileFormatError(
        f"adapter '{directory}' was trained on a different base model: the weights of layer(s) {which} differ "
        f"from the ones it was saved with (fingerprint {have[:12]}… ≠ {meta['fingerprint'][:12]}…). Load it onto "
        "the base weights it was trained on, or pass check_fingerprint=False (CLI: --no-check-fingerprint) if "
        "you know the base is compatible."
    )


def adapter_size_bytes(directory: str | Path) -> int:
    """Bytes on disk of a saved adapter (weights + config)."""
    directory = Path(directory)
    return sum((directory / n).stat().st_size for n in (WEIGHTS_NAME, CONFIG_NAME) if (directory / n).exists())
