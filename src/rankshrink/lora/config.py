"""What a LoRA adapter is: rank, scaling, dropout, initialisation and which layers.

``LoraConfig`` mirrors the fields of Hugging Face PEFT's ``LoraConfig`` that matter
for plain ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` layers, under the same names, so
that ``adapter_config.json`` files move between the two libraries. Validation happens
at construction: a bad value raises :class:`~rankshrink.errors.ConfigError` naming
the parameter and the fix.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

from ..errors import ConfigError

# Accepted values of ``init_lora_weights``:
#   True / "kaiming": A Kaiming-uniform (as nn.Linear's default), B zeros -> adapter starts at 0
#   "gaussian":       A ~ N(0, 1/r²), B zeros -> adapter starts at 0
#   "pissa":          A, B = the top-r SVD part of W (split √S each side); the base keeps
#                     the residual W - s·B·A, so the adapted layer starts equal to the original
#   False:            A and B left as random (Kaiming) - the layer changes; for tests only
INIT_CHOICES = (True, False, "kaiming", "gaussian", "pissa")

Target = Union[str, re.Pattern, type, Sequence[Union[str, re.Pattern, type]], None]

PEFT_TYPE = "LORA"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def scaling_for(r: int, alpha: float, use_rslora: bool) -> float:
    """The factor ``s`` in ``W + s·B·A``: ``alpha/r``, or ``alpha/√r`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def alpha_for(r: int, scaling: float, use_rslora: bool) -> float:
    """Inverse of :func:`scaling_for`: the ``alpha`` that gives ``scaling`` at rank ``r``."""
    return scaling * math.sqrt(r) if use_rslora else scaling * r


@dataclass
class LoraConfig:
    """Settings of one LoRA adapter.

    r: rank of the update ``ΔW = s·B·A`` (A: r × in, B: out × r).
    lora_alpha: scale numerator; ``s = lora_alpha / r`` (or ``/ √r`` with ``use_rslora``).
    target_modules: which layers get an adapter - a layer name or list of names (a
        name matches a layer whose qualified name equals it or ends with ``.name``, as
        in PEFT), a layer type (``"Linear"``, ``"Conv1d"``, ``"Conv2d"``, ``"Factorized"``,
        or the class itself), ``"all"`` for every supported layer, or a regular
        expression (a ``re.Pattern``, or a string that is neither a name nor a type)
        that must match the whole qualified name.
    lora_dropout: dropout probability on the adapter's input (training only).
    use_rslora: rank-stabilised scaling ``alpha/√r``.
    init_lora_weights: see ``INIT_CHOICES`` above.
    bias, fan_in_fan_out: PEFT fields kept for file compatibility; only ``"none"`` and
        ``False`` are supported.
    """

    r: int = 8
    lora_alpha: float = 8.0
    target_modules: Target = None
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    bias: str = "none"
    fan_in_fan_out: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        if not _is_int(self.r) or self.r < 1:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {self.r!r}; pass e.g. r=4 (--rank 4).")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ConfigError(
                f"LoRA lora_alpha must be a positive number, got {self.lora_alpha!r}; the adapter's "
                "scale is alpha/r, so pass e.g. lora_alpha=2*r (--alpha 8 for rank 4)."
            )
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"LoRA lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"LoRA use_rslora must be True or False, got {self.use_rslora!r}.")
        init = self.init_lora_weights
        if isinstance(init, str):
            init = init.lower()
            self.init_lora_weights = init
        if init not in INIT_CHOICES or (isinstance(init, (int, float)) and not isinstance(init, bool)):
            raise ConfigError(
                f"LoRA init_lora_weights must be one of True, 'kaiming', 'gaussian', 'pissa' or False, "
                f"got {self.init_lora_weights!r}."
            )
        if self.bias != "none":
            raise ConfigError(f"LoRA bias={self.bias!r} is not supported; only bias='none' (biases stay frozen).")
        if self.fan_in_fan_out:
            raise ConfigError("LoRA fan_in_fan_out=True (GPT-2 Conv1D weights) is not supported; use False.")
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pattern, Mapping):
                raise ConfigError(f"LoRA {name} must be a mapping of layer name to value, got {pattern!r}.")
        for layer, value in self.rank_pattern.items():
            if not _is_int(value) or value < 1:
                raise ConfigError(f"LoRA rank_pattern['{layer}'] must be a positive integer, got {value!r}.")
        for layer, value in self.alpha_pattern.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"LoRA alpha_pattern['{layer}'] must be a positive number, got {value!r}.")
        _check_targets(self.target_modules)

    # ------------------------------------------------------------------ values
    @property
    def scaling(self) -> float:
        return scaling_for(self.r, self.lora_alpha, self.use_rslora)

    def rank_for(self, layer_name: str) -> int:
        return int(_pattern_lookup(self.rank_pattern, layer_name, self.r))

    def alpha_for(self, layer_name: str) -> float:
        return float(_pattern_lookup(self.alpha_pattern, layer_name, self.lora_alpha))

    def scaling_for(self, layer_name: str) -> float:
        return scaling_for(self.rank_for(layer_name), self.alpha_for(layer_name), self.use_rslora)

    # ------------------------------------------------------------------ JSON
    def to_peft_dict(self, target_names: Sequence[str] | None = None) -> dict:
        """The PEFT ``adapter_config.json`` fields (``target_names`` replaces the targets)."""
        targets = list(target_names) if target_names is not None else _targets_to_json(self.target_modules)
        init = self.init_lora_weights
        return {
            "peft_type": PEFT_TYPE,
            "task_type": None,
            "base_model_name_or_path": None,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": targets,
            "lora_dropout": self.lora_dropout,
            "use_rslora": self.use_rslora,
            "bias": self.bias,
            "fan_in_fan_out": self.fan_in_fan_out,
            "init_lora_weights": True if init == "kaiming" else init,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "modules_to_save": None,
            "use_dora": False,
            "inference_mode": True,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "adapter config") -> "LoraConfig":
        """Build from a PEFT-style mapping; unknown keys are ignored (as PEFT does)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source} must be a JSON object, got {type(data).__name__}.")
        peft_type = data.get("peft_type", PEFT_TYPE)
        if str(peft_type).upper() != PEFT_TYPE:
            raise ConfigError(f"{source} has peft_type={peft_type!r}; only LoRA adapters ('LORA') can be loaded.")
        if data.get("use_dora"):
            raise ConfigError(f"{source} is a DoRA adapter (use_dora=true), which rankshrink does not support.")
        kwargs = {}
        for key in ("r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora",
                    "init_lora_weights", "bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern"):
            if key in data and data[key] is not None:
                kwargs[key] = data[key]
        if kwargs.get("init_lora_weights") not in (None, *INIT_CHOICES):
            kwargs["init_lora_weights"] = True  # e.g. "loftq", "olora": irrelevant once trained
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


def _pattern_lookup(pattern: Mapping[str, Any], layer_name: str, default):
    if layer_name in pattern:
        return pattern[layer_name]
    for key, value in pattern.items():  # PEFT matches pattern keys as name suffixes / regexes
        if layer_name.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", layer_name):
            return value
    return default


def _check_targets(target: Target) -> None:
    if target is None:
        return
    items = [target] if isinstance(target, (str, re.Pattern, type)) else target
    try:
        items = list(items)
    except TypeError:
        raise ConfigError(
            f"LoRA target_modules must be a name, a type, a regex or a list of them, got {target!r}."
        ) from None
    if not items:
        raise ConfigError("LoRA target_modules is an empty list; name at least one layer, e.g. ['fc1'] or 'Linear'.")
    for item in items:
        if not isinstance(item, (str, re.Pattern, type)):
            raise ConfigError(f"LoRA target {item!r} must be a string, a compiled regex or a layer class.")
        if isinstance(item, str) and not item:
            raise ConfigError("LoRA target_modules contains an empty string; remove it.")


def _targets_to_json(target: Target):
    if target is None:
        return None
    if isinstance(target, str):
        return target
    if isinstance(target, re.Pattern):
        return target.pattern
    if isinstance(target, type):
        return target.__name__
    return [t.pattern if isinstance(t, re.Pattern) else t.__name__ if isinstance(t, type) else t for t in target]
