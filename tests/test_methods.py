"""The method registry: one module per method, everything else asks the registry."""

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from rankshrink.errors import ConfigError, LayerError
from rankshrink.methods import (
    CPConfig,
    Method,
    MethodConfig,
    SVDConfig,
    Tucker2Config,
    config_from_json,
    factorize,
    get_method,
    make_config,
    method_names,
    methods_for,
    register,
    select_options,
)
from rankshrink.plan import Plan

SRC = Path(__file__).resolve().parents[1] / "src" / "rankshrink"


def _method_name_literals(name: str) -> set[str]:
    """Source files (relative to the package) holding ``name`` as a string literal used as a method name.

    A literal that indexes something (``base["weight"]``), names an attribute (``getattr(m, "weight")``),
    is a keyword value handed to a library (``init="svd"``) or sits in ``__all__`` is not a method name.
    """
    files = set()
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Constant) and node.value == name):
                continue
            parent = parents.get(node)
            if isinstance(parent, ast.Subscript) or isinstance(parent, ast.keyword):
                continue
            if isinstance(parent, ast.Call) and getattr(parent.func, "id", "") in ("getattr", "hasattr", "setattr"):
                continue
            grand = parents.get(parent)
            if isinstance(grand, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in grand.targets):
                continue
            if isinstance(parent, ast.Expr):  # a docstring that is only the name
                continue
            files.add(str(path.relative_to(SRC)))
    return files


@pytest.mark.parametrize("name", method_names())
def test_each_method_name_lives_in_its_own_module(name):
    files = _method_name_literals(name)
    assert files == {f"methods/{name}.py"}, files


def test_registry_order_layers_and_defaults():
    assert method_names() == ("svd", "embedding", "spatial", "weight", "tucker2", "cp")
    assert methods_for(nn.Embedding(10, 4)) == ("embedding",)
    assert methods_for(nn.Linear(3, 4)) == ("svd",)
    assert methods_for(nn.Conv2d(3, 4, 3)) == ("spatial", "weight", "tucker2", "cp")
    assert methods_for(nn.Conv1d(3, 4, 3)) == ("weight", "tucker2", "cp")
    with pytest.raises(LayerError, match="unknown method 'qr'; known methods are svd, embedding, spatial"):
        get_method("qr")


def test_configs_validate_and_round_trip_through_json():
    config = SVDConfig(rank=8, fit="activations", algorithm="randomized", seed=3)
    assert config.method == "svd" and config.options()["algorithm"] == "randomized"
    again = config_from_json(config.to_json())
    assert again == config and hash(again) == hash(config)
    assert make_config("tucker2", [4, 2]) == Tucker2Config(rank=(4, 2))
    for bad, message in (({"rank": 0}, "rank must be a positive integer"),
                         ({"rank": 2, "fit": "outputs"}, "fit must be one of weights, activations"),
                         ({"rank": 2, "damping": -1.0}, "damping must be a finite number >= 0"),
                         ({"rank": 2, "algorithm": "qr"}, "algorithm must be one of auto, exact, randomized")):
        with pytest.raises(ConfigError, match=message):
            SVDConfig(**bad)
    with pytest.raises(ConfigError, match="algorithm must be one of auto, als, compressed"):
        CPConfig(rank=2, algorithm="exact")
    with pytest.raises(ConfigError, match="unknown factorization option.*'n_iter' for method 'svd'"):
        make_config("svd", 2, n_iter=3)
    with pytest.raises(ConfigError, match="pass either a method config"):
        make_config(config, 3)


def test_select_options_routes_shared_and_per_method_options():
    options = {"seed": 4, "power_iters": 1, "cp": {"algorithm": "als", "refine_iters": 0}}
    assert select_options("svd", options) == {"seed": 4, "power_iters": 1}
    assert select_options("cp", options) == {"seed": 4, "algorithm": "als", "refine_iters": 0}
    with pytest.raises(ConfigError, match="unknown factorization option"):
        select_options("svd", {"bogus": 1})
    with pytest.raises(ConfigError, match="unknown option.*'oversample' for method 'cp'"):
        select_options("cp", {"cp": {"oversample": 3}})


def test_a_config_drives_factorize_like_torchao_quantize():
    torch.manual_seed(0)
    layer = nn.Linear(20, 12).double()
    by_config = factorize(layer, SVDConfig(rank=5))
    by_name = factorize(layer, "svd", 5)
    assert all(torch.equal(a, b) for a, b in zip(by_config.state_dict().values(), by_name.state_dict().values()))
    full = factorize(layer, SVDConfig(rank=12))
    x = torch.randn(7, 20, dtype=torch.float64)
    assert torch.allclose(full(x), layer(x), atol=1e-10)


def test_a_new_method_is_one_class_and_one_config():
    """A method registered from outside the package works with factorize, plans and costs unchanged."""
    from dataclasses import dataclass

    from rankshrink.cost import factorized_cost
    from rankshrink.factorized import Factorized
    from rankshrink.methods import base

    @dataclass(frozen=True, kw_only=True)
    class HalfConfig(MethodConfig):
        method = "test-half"

    class Half(Method):  # a toy method: keep the top half of the output rows, SVD-free
        name, order, config_class, layer_types = "test-half", 99, HalfConfig, ("Linear",)

        def full_rank(self, geometry):
            return geometry["out_features"]

        def rank_estimates(self, weight, keep):
            return weight.shape[0], weight.shape[0]

        def build(self, geometry, rank, *, dtype=None, device=None):
            layers = [nn.Linear(geometry["in_features"], rank, bias=False, dtype=dtype, device=device),
                      nn.Linear(rank, geometry["out_features"], bias=geometry["bias"], dtype=dtype, device=device)]
            return Factorized(*layers, method=self.name, rank=rank, geometry=geometry)

        def dense_weight(self, factors):
            return factors[1] @ factors[0]

        def fit_weights(self, weight, rank, config):
            eye = torch.eye(weight.shape[0], rank, dtype=weight.dtype)
            return [weight[:rank], eye]

        def fit_activations(self, weight, rank, config, stats, *, centered, layer):
            return self.fit_weights(weight, rank, config)

    register(Half)
    try:
        layer = nn.Linear(6, 4)
        block = factorize(layer, "test-half", 4)
        assert torch.allclose(block.dense_weight(), layer.weight.detach(), atol=1e-6)
        plan = Plan.from_json(Plan.from_mapping({"fc": ("test-half", 2)}).to_json())
        assert plan["fc"].method == "test-half"
        assert factorized_cost({"type": "Linear", "in_features": 6, "out_features": 4, "bias": True},
                               "test-half", 2, (1,)).params == 6 * 2 + 2 * 4 + 4
    finally:
        base._REGISTRY.pop("test-half")
