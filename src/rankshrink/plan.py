"""The Plan: which layers to factorize, with which method, at which rank.

A plan is the hand-off between the analysis/search stages and model surgery. It
is plain data, serialised as versioned, human-editable JSON::

    {
      "format": "rankshrink-plan",
      "version": 1,
      "layers": {
        "features.0":   {"method": "tucker2", "rank": [8, 4]},
        "classifier.1": {"method": "svd", "rank": 12}
      },
      "metadata": {"model": "builtin:digits-cnn"}
    }
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from .errors import PlanError
from .factorized import ALL_METHODS
from ._callable import make_module_callable
from .fileio import atomic_write_json, read_json

PLAN_FORMAT = "rankshrink-plan"
PLAN_VERSION = 1


@dataclass(frozen=True)
class LayerPlan:
    """One layer's entry: a method and a rank (tucker2: (R_out, R_in) or one int)."""

    method: str
    rank: int | tuple[int, int]

    def __post_init__(self):
        if self.method not in ALL_METHODS:
            raise PlanError(f"unknown method {self.method!r}; known methods are {', '.join(ALL_METHODS)}.")
        rank = self.rank
        if isinstance(rank, list):
            rank = tuple(rank)
            object.__setattr__(self, "rank", rank)
        valid_int = isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1
        valid_pair = (isinstance(rank, tuple) and len(rank) == 2 and self.method == "tucker2"
                      and all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rank))
        if not (valid_int or valid_pair):
            pair = " or a pair [R_out, R_in]" if self.method == "tucker2" else ""
            raise PlanError(f"rank must be a positive integer{pair}, got {self.rank!r}.")

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "rank": list(self.rank) if isinstance(self.rank, tuple) else self.rank}


@dataclass
class Plan:
    """Ordered mapping of qualified layer names (``features.0``) to :class:`LayerPlan`."""

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        layers = {}
        for name, entry in dict(self.layers).items():
            layers[name] = _coerce_entry(name, entry)
        self.layers = layers

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> "Plan":
        """Build from ``{"fc1": ("svd", 8)}`` or ``{"fc1": {"method": "svd", "rank": 8}}``."""
        return cls(dict(mapping), dict(metadata or {}))

    def __getitem__(self, name: str) -> LayerPlan:
        return self.layers[name]

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def items(self):
        return self.layers.items()

    def with_layer(self, name: str, method: str, rank) -> "Plan":
        """A copy with one entry set (added or replaced)."""
        layers = dict(self.layers)
        layers[name] = LayerPlan(method, rank)
        return Plan(layers, dict(self.metadata))

    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION,
                "layers": {name: entry.to_json() for name, entry in self.layers.items()},
                "metadata": self.metadata}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def key(self) -> str:
        """Canonical text of the layers alone (metadata excluded): a cache key."""
        return json.dumps({n: e.to_json() for n, e in sorted(self.layers.items())}, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> "Plan":
        if not isinstance(data, Mapping):
            raise PlanError(f"{source}: a plan must be a JSON object, got {type(data).__name__}.")
        if data.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise PlanError(f"{source}: 'format' is {data.get('format')!r}, expected {PLAN_FORMAT!r}.")
        version = data.get("version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise PlanError(f"{source}: plan version {version!r} is not supported (this rankshrink reads version {PLAN_VERSION}).")
        layers = data.get("layers")
        if not isinstance(layers, Mapping):
            raise PlanError(f"{source}: 'layers' must be an object mapping layer names to {{\"method\", \"rank\"}}.")
        metadata = data.get("metadata", {})
        if not isinstance(metadata, Mapping):
            raise PlanError(f"{source}: 'metadata' must be an object.")
        try:
            return cls(dict(layers), dict(metadata))
        except PlanError as exc:
            raise PlanError(f"{source}: {exc}") from None

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"{source} is not valid JSON ({exc}).") from None
        return cls.from_dict(data, source)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        return cls.from_dict(read_json(path, "plan file"), f"plan file '{path}'")


def _coerce_entry(name: str, entry: Any) -> LayerPlan:
    if not isinstance(name, str) or not name:
        raise PlanError(f"layer names must be non-empty strings, got {name!r}.")
    try:
        if isinstance(entry, LayerPlan):
            return entry
        if isinstance(entry, Mapping):
            unknown = set(entry) - {"method", "rank"}
            if unknown or "method" not in entry or "rank" not in entry:
                raise PlanError(f"needs exactly the keys 'method' and 'rank', got {sorted(entry)}.")
            return LayerPlan(entry["method"], entry["rank"])
        if isinstance(entry, (tuple, list)) and len(entry) == 2:
            return LayerPlan(entry[0], entry[1])
    except PlanError as exc:
        raise PlanError(f"layer '{name}': {exc}") from None
    raise PlanError(f"layer '{name}': expected {{\"method\": ..., \"rank\": ...}}, got {entry!r}.")


# ``rankshrink.plan(model, data, tolerance=... | budget=...)`` runs the rank search.
make_module_callable(__name__, "rankshrink.search:plan")
