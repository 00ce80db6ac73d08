"""The Plan: which layers to factorize, and with which method config (method, rank, fit, options).

A plan is the hand-off between the analysis/search stages and model surgery, and it
reproduces its model: every entry is a full method config (see :mod:`rankshrink.methods`),
and a plan whose entries fit activations records how their calibration was drawn.
It is plain data, serialised as versioned, human-editable JSON::

    {
      "format": "rankshrink-plan",
      "version": 2,
      "layers": {
        "features.0":   {"method": "tucker2", "rank": [8, 4]},
        "classifier.1": {"method": "svd", "rank": 12, "fit": "activations",
                         "options": {"algorithm": "auto", "seed": 0}}
      },
      "calibration": {"samples": 512, "seed": 0, "batch_size": 128},
      "metadata": {"model": "builtin:digits-cnn"}
    }

``fit`` defaults to 'weights' and ``options`` to the method's defaults, so a hand-written
entry needs only ``method`` and ``rank``. Version-1 files (entries of method and rank
only) load as weight fits.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from .errors import ConfigError, FileFormatError, LayerError, PlanError
from .files import atomic_write_json, read_json
from .methods import MethodConfig, config_from_json, make_config

__all__ = ["Plan", "PLAN_FORMAT", "PLAN_VERSION", "DEFAULT_CALIBRATION"]

PLAN_FORMAT = "rankshrink-plan"
PLAN_VERSION = 2
READABLE_VERSIONS = (1, 2)
# How an activation fit's statistics are drawn when a plan does not say: the training split,
# a seeded random subset of this many samples, in batches of this size.
DEFAULT_CALIBRATION = {"samples": 512, "seed": 0, "batch_size": 128}


@dataclass
class Plan:
    """Ordered mapping of qualified layer names (``features.0``) to method configs.

    ``calibration``: how the statistics of the entries that fit activations are drawn
    (``samples``, ``seed``, ``batch_size`` and, when known, the ``data`` fingerprint of
    the split they came from); None means :data:`DEFAULT_CALIBRATION`. ``fold_batchnorm``:
    (layer, BatchNorm) pairs folded before anything is factorized (the BatchNorm becomes an
    ``Identity``, the layer takes its scale and shift; JSON key ``fold_batchnorm``).
    """

    layers: dict[str, MethodConfig] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    fold_batchnorm: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.layers = {name: _coerce_entry(name, entry) for name, entry in dict(self.layers).items()}
        if self.calibration is not None:
            self.calibration = _check_calibration(self.calibration)
        self.fold_batchnorm = _check_folds(self.fold_batchnorm)

    def _copy(self, layers: Mapping[str, Any] | None = None) -> "Plan":
        return Plan(dict(self.layers if layers is None else layers), dict(self.metadata),
                    None if self.calibration is None else dict(self.calibration), list(self.fold_batchnorm))

    def with_folds(self, folds: list[tuple[str, str]]) -> "Plan":
        """A copy that folds these (layer, BatchNorm) pairs first (replacing the plan's own)."""
        plan = self._copy()
        plan.fold_batchnorm = _check_folds(folds)
        return plan

    def only(self, names) -> "Plan":
        """A copy with only the entries named in ``names`` (the folds are kept)."""
        keep = set(names)
        return self._copy({n: e for n, e in self.layers.items() if n in keep})

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], metadata: Mapping[str, Any] | None = None, *,
                     calibration: Mapping[str, Any] | None = None) -> "Plan":
        """Build from ``{"fc1": ("svd", 8)}``, ``{"fc1": {"method": "svd", "rank": 8}}`` or configs."""
        return cls(dict(mapping), dict(metadata or {}), None if calibration is None else dict(calibration))

    def __getitem__(self, name: str) -> MethodConfig:
        return self.layers[name]

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def items(self):
        return self.layers.items()

    def with_layer(self, name: str, method: str | MethodConfig, rank: Any = None, **options: Any) -> "Plan":
        """A copy with one entry set (added or replaced)."""
        layers = dict(self.layers)
        layers[name] = _coerce_entry(name, make_config(method, rank, **options) if rank is not None or options
                                     else method)
        return self._copy(layers)

    def with_fit(self, fit: str) -> "Plan":
        """A copy with every entry fitted to ``fit`` ('weights' or 'activations')."""
        from .methods import FITS
        from .validation import check_choice

        check_choice(fit, "fit", FITS)
        return self._copy({name: entry.replace(fit=fit) for name, entry in self.layers.items()})

    def with_options(self, **options: Any) -> "Plan":
        """A copy with ``options`` (e.g. ``seed=3``) set on every entry that has them."""
        layers = {}
        for name, entry in self.layers.items():
            own = {k: v for k, v in options.items() if k in entry.option_names()}
            try:
                layers[name] = entry.replace(**own) if own else entry
            except (ConfigError, LayerError) as exc:
                raise PlanError(f"layer '{name}': {exc}") from None
        return self._copy(layers)

    @property
    def activation_layers(self) -> list[str]:
        """The entries fitted to activations: applying them needs calibration data."""
        return [name for name, entry in self.layers.items() if entry.fit == "activations"]

    def calibration_settings(self) -> dict[str, Any]:
        return {**DEFAULT_CALIBRATION, **(self.calibration or {})}

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format": PLAN_FORMAT, "version": PLAN_VERSION,
                                "layers": {name: entry.to_json() for name, entry in self.layers.items()}}
        if self.calibration is not None:
            data["calibration"] = dict(self.calibration)
        if self.fold_batchnorm:
            data["fold_batchnorm"] = [list(pair) for pair in self.fold_batchnorm]
        data["metadata"] = self.metadata
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def key(self) -> str:
        """Canonical text of the layers and folds (metadata excluded, order ignored): a cache key."""
        layers = {n: e.to_json() for n, e in sorted(self.layers.items())}
        if not self.fold_batchnorm:
            return json.dumps(layers, sort_keys=True)
        return json.dumps({"layers": layers, "fold_batchnorm": sorted(map(list, self.fold_batchnorm))},
                          sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> "Plan":
        if not isinstance(data, Mapping):
            raise PlanError(f"{source}: a plan must be a JSON object, got {type(data).__name__}.")
        if data.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise PlanError(f"{source}: 'format' is {data.get('format')!r}, expected {PLAN_FORMAT!r}.")
        version = data.get("version", PLAN_VERSION)
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise PlanError(f"{source}: plan version {version!r} is not supported (this rankshrink reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))}).")
        layers = data.get("layers")
        if not isinstance(layers, Mapping):
            raise PlanError(f"{source}: 'layers' must be an object mapping layer names to {{\"method\", \"rank\"}}.")
        metadata = data.get("metadata", {})
        if not isinstance(metadata, Mapping):
            raise PlanError(f"{source}: 'metadata' must be an object.")
        calibration = data.get("calibration")
        if calibration is not None and not isinstance(calibration, Mapping):
            raise PlanError(f"{source}: 'calibration' must be an object such as {json.dumps(DEFAULT_CALIBRATION)}.")
        if version == 1:  # version 1 had no fits: every entry is a weight fit
            for name, entry in layers.items():
                if isinstance(entry, Mapping) and ("fit" in entry or "options" in entry):
                    raise PlanError(f"{source}: layer '{name}': 'fit' and 'options' need plan version 2.")
        folds = data.get("fold_batchnorm", [])
        try:
            return cls(dict(layers), dict(metadata), None if calibration is None else dict(calibration), folds)
        except PlanError as exc:
            raise PlanError(f"{source}: {exc}") from None

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> "Plan":
        from .files.atomic import parse_json

        try:
            data = parse_json(text, source)
        except FileFormatError as exc:
            raise PlanError(str(exc)) from None
        return cls.from_dict(data, source)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        return cls.from_dict(read_json(path, "plan file"), f"plan file '{path}'")


def _coerce_entry(name: Any, entry: Any) -> MethodConfig:
    if not isinstance(name, str) or not name:
        raise PlanError(f"layer names must be non-empty strings, got {name!r}.")
    try:
        if isinstance(entry, MethodConfig):
            return entry
        if isinstance(entry, Mapping):
            return config_from_json(entry)
        if isinstance(entry, (tuple, list)) and len(entry) == 2:
            return make_config(entry[0], entry[1])
    except (ConfigError, LayerError, TypeError) as exc:
        raise PlanError(f"layer '{name}': {exc}") from None
    raise PlanError(f"layer '{name}': expected {{\"method\": ..., \"rank\": ...}}, got {entry!r}.")


def _check_calibration(calibration: Mapping[str, Any]) -> dict[str, Any]:
    from .validation import check_int

    known = {"samples", "seed", "batch_size", "data"}
    unknown = sorted(set(calibration) - known)
    if unknown:
        raise PlanError(f"'calibration' has unknown key(s) {', '.join(map(repr, unknown))}; known: "
                        f"{', '.join(sorted(known))}.")
    try:
        if calibration.get("samples") is not None:
            check_int(calibration["samples"], "calibration.samples", minimum=1, error=PlanError)
        for key in ("seed", "batch_size"):
            if key in calibration:
                check_int(calibration[key], f"calibration.{key}", minimum=0 if key == "seed" else 1,
                          error=PlanError)
    except PlanError:
        raise
    if "data" in calibration and not isinstance(calibration["data"], str):
        raise PlanError("calibration.data must be a data fingerprint (a string).")
    return dict(calibration)


def _check_folds(folds: Any) -> list[tuple[str, str]]:
    if not isinstance(folds, (list, tuple)):
        raise PlanError(f"'fold_batchnorm' must be a list of [layer, batchnorm] name pairs, got {folds!r}.")
    pairs = []
    for pair in folds:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(n, str) and n for n in pair):
            raise PlanError(f"'fold_batchnorm' entries must be [layer, batchnorm] name pairs, got {pair!r}.")
        pairs.append((pair[0], pair[1]))
    return pairs
