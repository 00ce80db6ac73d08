"""Cost model: rankshrink.cost (params, bytes, MACs, break-even ranks, E/C ratios)."""

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import rankshrink as rs
from rankshrink.cost import (
    Cost,
    break_even_rank,
    conv_cost,
    conv_output_size,
    count,
    dense_cost,
    factorized_cost,
    linear_break_even,
    linear_cost,
    module_cost,
    size_ratio,
    speed_ratio,
)
from rankshrink.errors import ConfigError, DataError
from rankshrink.factorized import layer_geometry
from rankshrink.methods import factorize, full_rank


def flops(model, x):
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(x)
    return counter.get_total_flops()


# ---------------------------------------------------------------- hand formulas

def test_linear_hand_formula():
    c = linear_cost(in_features=10, out_features=4, bias=True, positions=3)
    assert c == Cost(params=44, multiplies=120, additions=3 * 4 * 9 + 12)
    assert c.macs == 120
    c = linear_cost(10, 4, bias=False)
    assert c == Cost(40, 40, 36)


def test_linear_on_3d_input_counts_positions():
    model = nn.Sequential(nn.Linear(5, 3))
    x = torch.randn(2, 7, 5)  # (N, L, in): 7 positions per sample
    costs = count(model, x)
    row = costs.layer("0")
    assert row.input_size == (7,)
    assert row.macs == 7 * 3 * 5 and costs.macs == 7 * 3 * 5
    assert 2 * costs.macs * 2 == flops(model, x)  # batch 2, flops = 2·MACs


def test_conv1d_hand_formula():
    layer = nn.Conv1d(4, 6, 5, stride=2, padding=1, dilation=2)
    # L_out = (20 + 2 - 2·4 - 1)//2 + 1 = 7
    cost, out = module_cost(layer, (20,))
    assert out == (7,)
    assert cost.params == 6 * 4 * 5 + 6
    assert cost.multiplies == 7 * 6 * 4 * 5
    assert cost.additions == 7 * 6 * (4 * 5 - 1) + 7 * 6


def test_conv2d_hand_formula_with_groups():
    layer = nn.Conv2d(8, 12, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=4, bias=False)
    # H_out = (11 + 2 - 2 - 1)//2 + 1 = 6; W_out = (9 + 4 - 8 - 1)//1 + 1 = 5
    cost, out = module_cost(layer, (11, 9))
    assert out == (6, 5)
    per_output = (8 // 4) * 15
    assert cost == Cost(12 * per_output, 30 * 12 * per_output, 30 * 12 * (per_output - 1))
    assert conv_cost(8, 12, (3, 5), 4, False, (6, 5)) == cost


def test_conv_output_size_strings():
    assert conv_output_size((10, 7), (4, 3), (1, 1), "same", (1, 2)) == (10, 7)
    assert conv_output_size((10, 7), (4, 3), (1, 1), "valid", (1, 2)) == (7, 3)


def test_cp_block_counts_depthwise_as_grouped():
    conv = nn.Conv2d(6, 8, 3, padding=1)
    block = factorize(conv, "cp", 4)
    cost, out = module_cost(block, (10, 10))
    P = 100
    expected_macs = P * 4 * 6 + P * 4 * 3 + P * 4 * 3 + P * 8 * 4
    assert out == (10, 10)
    assert cost.multiplies == expected_macs
    assert cost.params == 4 * 6 + 4 * 3 + 4 * 3 + 8 * 4 + 8
    geometry = layer_geometry(conv)
    assert factorized_cost(geometry, "cp", 4, (10, 10)) == cost
    assert dense_cost(geometry, (10, 10)) == module_cost(conv, (10, 10))[0]


def test_module_cost_rejects_unknown_modules():
    with pytest.raises(ConfigError, match="ReLU"):
        module_cost(nn.ReLU(), (3,))


# ---------------------------------------------------------------- count vs FlopCounterMode

class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 12, (3, 5), stride=2, padding=(1, 2), padding_mode="reflect"), nn.BatchNorm2d(12), nn.ReLU(),
            nn.Conv2d(12, 12, 3, groups=12, padding=1), nn.ReLU(),           # depthwise: counted, not factorized
            nn.Conv2d(12, 10, 1))
        self.seq = nn.Conv1d(10, 6, 3, dilation=2, padding="same")
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 32, 20), nn.ReLU(), nn.Linear(20, 5))

    def forward(self, x):
        h = self.features(x)                        # (N, 10, 4, 8)
        h = self.seq(h.flatten(2))                  # (N, 6, 32)
        return self.head(h)


PLANS = {
    "svd": {"head.1": ("svd", 7), "head.3": ("svd", 3)},
    "spatial": {"features.0": ("spatial", 5), "features.2": ("spatial", 6)},
    "weight": {"features.0": ("weight", 4), "features.2": ("weight", 6), "seq": ("weight", 4)},
    "tucker2": {"features.0": ("tucker2", (4, 2)), "features.2": ("tucker2", 5), "features.7": ("tucker2", 3),
                "seq": ("tucker2", 3)},
    "cp": {"features.0": ("cp", 4), "features.2": ("cp", 6), "seq": ("cp", 3)},
}


def test_count_matches_flop_counter_on_original():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(3, 3, 8, 16)
    costs = count(model, x)
    assert 2 * costs.macs * 3 == flops(model, x)
    # Rows are the factorizable layers; the depthwise conv still counts in the totals.
    assert {row.name for row in costs.layers} == {"features.0", "features.2", "features.7", "seq", "head.1", "head.3"}
    assert costs.other_multiplies == 12 * 9 * (4 * 8)
    assert costs.macs == sum(row.macs for row in costs.layers) + costs.other_multiplies
    assert costs.params == sum(p.numel() for p in model.parameters())
    assert costs.other_params == 2 * 12 + (12 * 9 + 12)  # BatchNorm affine + the depthwise conv
    assert ("features.3", "BatchNorm2d has no weight matrix to factorize") in costs.skipped
    assert any(name == "features.5" and "depthwise" in why for name, why in costs.skipped)
    json.dumps(costs.to_dict())


@pytest.mark.parametrize("method", sorted(PLANS))
def test_count_matches_flop_counter_on_factorized(method):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 8, 16)
    small = rs.apply(model, rs.Plan.from_mapping(PLANS[method]))
    costs = count(small, x)
    assert 2 * costs.macs * 2 == flops(small, x)
    for name in PLANS[method]:
        row = costs.layer(name)
        assert row.method == method and row.type == layer_geometry(model.get_submodule(name))["type"]
        assert row.params == sum(p.numel() for p in small.get_submodule(name).parameters())
    # Factor layers are reported inside their block, not as rows of their own.
    assert not any(row.name.startswith(f"{name}.") for name in PLANS[method] for row in costs.layers)
    assert costs.params == sum(p.numel() for p in small.parameters())
    assert costs.macs < count(model, x).macs


def test_count_restores_mode_and_rejects_bad_input():
    model = SmallCNN().train()
    count(model, torch.randn(1, 3, 8, 16))
    assert model.training
    # The failing layer is named, with what it expects and what it got.
    with pytest.raises(DataError, match=r"layer 'features.0' \(Conv2d, expects \(batch, 3, …, …\) inputs\) got "
                                        r"\(1, 4, 8, 16\)"):
        count(model, torch.randn(1, 4, 8, 16))
    with pytest.raises(DataError, match="batch \\(first\\) dimension"):
        count(model, torch.tensor(1.0))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.unused = nn.Linear(6, 100)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.shared(self.shared(x)))


def test_layer_called_twice_counts_twice_and_unused_costs_nothing():
    model = Twice()
    x = torch.randn(4, 6)
    costs = count(model, x)
    row = costs.layer("shared")
    assert row.calls == 2 and row.macs == 2 * 36 and row.params == 42
    assert "unused" not in {row.name for row in costs.layers}
    assert costs.macs == 2 * 36 + 12
    assert 2 * costs.macs * 4 == flops(model, x)
    assert costs.other_params == 6 * 100 + 100  # counted among the model's parameters, not a layer's


def test_shared_factorized_block_counted_per_call():
    model = Twice()
    small = rs.apply(model, {"shared": ("svd", 2)})
    costs = count(small, torch.randn(1, 6))
    row = costs.layer("shared")
    assert row.calls == 2 and row.macs == 2 * (6 * 2 + 2 * 6) and row.method == "svd"


def test_bytes_by_dtype():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    x = torch.randn(1, 3, 6, 6)
    full = count(model, x)
    n = sum(p.numel() for p in model.parameters())
    assert full.bytes == 4 * n and full.bytes_by_dtype == {"float32": 4 * n}
    half = count(model.half(), x.half())
    assert half.bytes == full.bytes // 2 and half.bytes_by_dtype == {"float16": 2 * n}
    assert half.macs == full.macs
    assert sum(row.bytes for row in half.layers) == 2 * n
    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    costs = count(bn, x)
    assert costs.bytes_by_dtype["int64"] == 8  # num_batches_tracked is a buffer, stored too
    assert costs.bytes_by_dtype["float32"] == 4 * (4 * 27 + 4 + 4 * 4)  # conv, BN affine + running stats


# ---------------------------------------------------------------- break-even and ratios

def test_linear_break_even():
    assert linear_break_even(8192, 128) == 126
    assert linear_break_even(128, 8192) == 126
    assert linear_break_even(4, 4) == 1   # 1·8 < 16, 2·8 = 16 is not cheaper
    assert linear_break_even(1, 10) == 0
    for m, n in [(8192, 128), (100, 50), (7, 3), (64, 64), (1, 10)]:
        for bias in (True, False):
            geometry = layer_geometry(nn.Linear(n, m, bias=bias, device="meta"))
            assert break_even_rank(geometry, "svd") == linear_break_even(m, n)
            assert break_even_rank(geometry, "svd", (5,), by="macs") == linear_break_even(m, n)


@pytest.mark.parametrize("objective", ["params", "macs"])
@pytest.mark.parametrize("layer,methods", [
    (nn.Conv2d(32, 48, 3, padding=1, device="meta"), ("spatial", "weight", "tucker2", "cp")),
    (nn.Conv2d(16, 24, (3, 5), stride=2, padding="valid", bias=False, device="meta"),
     ("spatial", "weight", "tucker2", "cp")),
    (nn.Conv1d(20, 30, 5, device="meta"), ("weight", "tucker2", "cp")),
])
def test_conv_break_even_is_last_cheaper_rank(layer, methods, objective):
    geometry = layer_geometry(layer)
    size = (12, 14) if isinstance(layer, nn.Conv2d) else (17,)
    dense = dense_cost(geometry, size)

    def value(cost):
        return cost.params if objective == "params" else cost.macs

    for method in methods:
        r = break_even_rank(geometry, method, size, by=objective)
        assert 1 <= r < full_rank(geometry, method), method
        assert value(factorized_cost(geometry, method, r, size)) < value(dense), method
        assert value(factorized_cost(geometry, method, r + 1, size)) >= value(dense), method


def test_break_even_errors():
    geometry = layer_geometry(nn.Linear(4, 4, device="meta"))
    with pytest.raises(ConfigError, match="by must be"):
        break_even_rank(geometry, "svd", by="bytes")
    with pytest.raises(ConfigError, match="input size"):
        break_even_rank(geometry, "svd", by="macs")


def test_size_and_speed_ratios_against_hand_values():
    geometry = layer_geometry(nn.Linear(100, 50, device="meta"))
    original = dense_cost(geometry, (1,))
    compressed = factorized_cost(geometry, "svd", 10, (1,))
    assert original.params == 5050 and compressed.params == 10 * 100 + 50 * 10 + 50
    assert size_ratio(original, compressed) == pytest.approx(5050 / 1550)
    assert speed_ratio(original, compressed) == pytest.approx(5000 / 1500)
    conv = layer_geometry(nn.Conv2d(64, 64, 3, padding=1, bias=False, device="meta"))
    dense = dense_cost(conv, (8, 8))
    tucker = factorized_cost(conv, "tucker2", 16, (8, 8))
    assert dense.params == 64 * 64 * 9
    assert tucker.params == 16 * 64 + 16 * 16 * 9 + 64 * 16
    assert size_ratio(dense, tucker) == pytest.approx(36864 / 4352)
    assert speed_ratio(dense, tucker) == pytest.approx(36864 / 4352)  # every factor runs at 8×8
    assert size_ratio(dense, Cost(0, 0, 0)) == math.inf and speed_ratio(dense, Cost(0, 0, 0)) == math.inf


def test_tied_weights_counted_once_in_model_totals():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.encode = nn.Linear(6, 6)
            self.decode = nn.Linear(6, 6)
            self.decode.weight = self.encode.weight

        def forward(self, x):
            return self.decode(self.encode(x))

    costs = count(Tied(), torch.randn(1, 6))
    assert costs.params == 36 + 6 + 6
    assert costs.layer("encode").params == costs.layer("decode").params == 42  # each layer's own size
    assert costs.other_params == 0
