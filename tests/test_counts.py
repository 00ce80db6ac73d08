"""Counts that never lie: every op that multiplies is in ``rs.count``'s total.

The oracle is ``torch.utils.flop_counter.FlopCounterMode`` (MACs = flops / 2), run with the
fused attention fast paths off and ``scaled_dot_product_attention`` on its math backend: on
CPU the fused kernels are invisible to it (it reports 0 for them), so the oracle sees the
same matmuls a formula counts.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import rankshrink as rs
from rankshrink.inputs import batch_size, call_model
from rankshrink.models import CifarCNN, DigitsCNN, MnistMLP
from user_models import Attention, ImageAndSide, KeywordSpotter, ResNetish, TiedMLP, side_features


def oracle_macs(model: nn.Module, inputs) -> float:
    """FlopCounterMode's MACs per sample, with every matmul visible to it."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            call_model(model.eval(), inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
    return counter.get_total_flops() / 2 / batch_size(inputs)


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 10, num_layers=2, bidirectional=True, proj_size=4, batch_first=True)
        self.rnn = nn.RNN(8, 5, nonlinearity="relu")
        self.cell = nn.GRUCell(5, 7)
        self.lstm_cell = nn.LSTMCell(7, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h, _ = self.lstm(x)                        # (N, T, 8)
        h, _ = self.rnn(h.transpose(0, 1))          # sequence first: (T, N, 5)
        state = torch.zeros(x.shape[0], 7)
        c = (torch.zeros(x.shape[0], 3), torch.zeros(x.shape[0], 3))
        for step in h:                              # cells called once per step
            state = self.cell(step, state)
            c = self.lstm_cell(state, c)
        return self.head(c[0])


class Packed(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(4, 6, batch_first=True)

    def forward(self, x):
        lengths = torch.tensor([x.shape[1]] * (x.shape[0] - 1) + [max(1, x.shape[1] // 2)])
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
        out, hidden = self.gru(packed)
        return hidden[0]


class Transformerish(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
        self.cross = nn.MultiheadAttention(16, 2, kdim=6, vdim=5, batch_first=True, add_bias_kv=True)
        self.volume = nn.Conv3d(1, 4, 3, padding=1, groups=1)
        self.grouped = nn.Conv2d(4, 8, 3, groups=2)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)  # no formula of ours: measured
        self.head = nn.Linear(16, 3)

    def forward(self, tokens, keys, values, volume):
        h = self.layer(tokens)
        h = h + self.cross(h, keys, values)[0]
        v = self.volume(volume).mean(2)               # (N, 4, 6, 6)
        v = self.up(self.grouped(v)).mean((1, 2, 3))  # (N,)
        return self.head(h.mean(1)) + v[:, None]


def _digits_like(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))


CASES = {
    "DigitsCNN": (lambda: DigitsCNN(), lambda: _digits_like()),
    "CifarCNN": (lambda: CifarCNN(), lambda: torch.rand(2, 3, 32, 32)),
    "MnistMLP": (lambda: MnistMLP(), lambda: torch.rand(2, 1, 28, 28)),
    "ResNetish": (lambda: ResNetish(), lambda: _digits_like()),
    "KeywordSpotter": (lambda: KeywordSpotter(), lambda: _digits_like()),
    "TiedMLP": (lambda: TiedMLP(), lambda: _digits_like()),
    "ImageAndSide (tuple)": (lambda: ImageAndSide(), lambda: (_digits_like(), side_features(_digits_like()))),
    "ImageAndSide (dict)": (lambda: ImageAndSide(),
                            lambda: {"image": _digits_like(), "side": side_features(_digits_like())}),
    "Attention": (lambda: Attention(), lambda: torch.randint(0, 17, (2, 9))),
    "Recurrent": (lambda: Recurrent(), lambda: torch.rand(2, 7, 6)),
    "Packed GRU": (lambda: Packed(), lambda: torch.rand(3, 8, 4)),
    "Transformer, cross-attention, Conv3d, grouped and transposed convs": (
        lambda: Transformerish(),
        lambda: (torch.rand(2, 5, 16), torch.rand(2, 7, 6), torch.rand(2, 7, 5), torch.rand(2, 1, 4, 6, 6))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_total_macs_match_flop_counter_within_one_percent(name):
    make, example = CASES[name]
    torch.manual_seed(0)
    model, inputs = make().eval(), example()
    cost = rs.count(model, inputs)
    expected = oracle_macs(model, inputs)
    assert expected > 0
    assert cost.macs == pytest.approx(expected, rel=0.01), (cost.macs, expected)
    assert cost.macs == (sum(r.macs for r in cost.layers) + sum(r.macs for r in cost.others)
                         + sum(r.macs for r in cost.not_counted))
    assert cost.params == sum(p.numel() for p in model.parameters())
    json.dumps(cost.to_dict())


@pytest.mark.parametrize("name", ["ResNetish", "KeywordSpotter", "ImageAndSide (dict)", "Attention"])
def test_factorized_models_match_flop_counter_too(name):
    make, example = CASES[name]
    torch.manual_seed(0)
    model, inputs = make().eval(), example()
    rows = [r for r in rs.count(model, inputs).layers if r.method is None]
    plan = rs.Plan.from_mapping({r.name: (rs.methods.methods_for(r.geometry)[-1], 2) for r in rows
                                 if not rs.layers.tied_parameters(model, model.get_submodule(r.name))})
    small = rs.apply(model, plan)
    assert rs.count(small, inputs).macs == pytest.approx(oracle_macs(small, inputs), rel=0.01)


def test_the_gru_is_counted_per_step_times_steps():
    model = KeywordSpotter().eval()
    cost = rs.count(model, _digits_like(1))
    (gru,) = [row for row in cost.others if row.name == "gru"]
    steps, hidden, features = 16, 24, 32  # 64 samples, two stride-2 convs
    assert gru.macs == steps * 3 * hidden * (features + hidden)
    assert gru.params == sum(p.numel() for p in model.gru.parameters()) and gru.calls == 1
    assert "GRU" in gru.reason


def test_attention_rows_and_measured_ops():
    model = Attention().eval()
    ids = torch.randint(0, 17, (2, 9))
    cost = rs.count(model, ids)
    by_name = {row.name: row for row in cost.others}
    length, dim = 9, 16
    # q, k, v and output projections plus QK^T and softmax·V
    assert by_name["attn"].macs == 4 * length * dim * dim + 2 * length * length * dim
    embed = cost.layer("embed")  # an Embedding is a factorizable row now: a lookup of 9 indices per sample
    assert embed.macs == 0 and embed.params == 17 * 16 and embed.bytes == 17 * 16 * 4
    assert embed.type == "Embedding" and embed.input_size == (length,)
    (measured,) = cost.not_counted  # the functional attention and matmuls of forward() itself
    assert measured.name == "" and measured.macs == 4 * length * length * dim
    assert set(measured.ops) == {"bmm"}
    assert cost.other_multiplies == by_name["attn"].macs + measured.macs


def test_analyze_lists_others_not_counted_and_tied_layers(tmp_path):
    analysis = rs.analyze(TiedMLP().eval(), _digits_like())
    assert analysis.tied == [["first", "last"]]
    data = analysis.to_dict()
    for key in ("params", "bytes", "macs"):
        assert isinstance(data[key], int) and data[key] > 0  # whole-model totals at the top level
    assert data["tied"][0]["layers"] == ["first", "last"]
    middle = next(layer for layer in analysis.layers if layer.name == "middle")
    assert middle.macs == 2 * 64 * 64  # called twice
    attention = rs.analyze(Attention().eval(), torch.randint(0, 17, (1, 9))).to_dict()
    assert attention["macs"] == pytest.approx(oracle_macs(Attention().eval(), torch.randint(0, 17, (1, 9))), rel=0.01)
    assert [row["name"] for row in attention["others"]] == ["attn"]
    assert "embed" in [row["name"] for row in attention["layers"]]
    assert attention["not_counted"][0]["macs"] > 0 and "measured" in attention["not_counted"][0]["note"]


def test_lora_wrappers_are_measured_not_missed():
    from rankshrink.lora import LoraConfig, add_adapters

    model = MnistMLP(num_features=64).eval()
    adapted = add_adapters(model, LoraConfig(r=4, target_modules=["layers.0", "layers.2"]))
    x = _digits_like(2)
    assert rs.count(adapted, x).macs == pytest.approx(oracle_macs(adapted, x), rel=0.01)


def test_functional_ops_in_a_custom_layer_are_attributed_to_it():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5, 8))

        def forward(self, x):
            return F.linear(x, self.weight)

    model = nn.Sequential(nn.Linear(3, 8), Gate()).eval()
    cost = rs.count(model, torch.rand(4, 3))
    (row,) = cost.not_counted
    assert row.name == "1" and row.type == "Gate" and row.macs == 5 * 8
    assert cost.macs == 3 * 8 + 5 * 8


def _other_test_models():
    """The models defined in the other test modules, each with an input it takes."""
    import test_cost
    import test_data_aware
    import test_finetune
    import test_lora
    import test_reliability
    import test_surgery
    import test_train

    namespace: dict = {}
    exec(test_reliability.MODELS_PY, namespace)  # the CLI's user-model fixtures
    exec(test_finetune.MODEL_FILE, namespace)
    eight = torch.rand(2, 1, 8, 8)
    return {
        "test_cost.SmallCNN": (test_cost.SmallCNN, torch.rand(2, 3, 8, 16)),
        "test_cost.Twice": (test_cost.Twice, torch.rand(2, 6)),
        "test_data_aware._TwoBranch": (test_data_aware._TwoBranch, torch.rand(2, 2, 6, 6)),
        "test_finetune.Small": (namespace["Small"], eight),
        "test_lora.ConvNet": (test_lora.ConvNet, torch.rand(2, 3, 11, 12)),
        "test_lora.MLP": (test_lora.MLP, torch.rand(2, 16)),
        "test_surgery.Net": (test_surgery.Net, torch.rand(2, 3, 4, 4)),
        "test_surgery.Shared": (test_surgery.Shared, torch.rand(2, 6)),
        "test_surgery.Tied": (test_surgery.Tied, torch.rand(2, 6)),
        "test_train._BNNet": (test_train._BNNet, eight),
        **{f"test_reliability.{name}": (namespace[name], (eight, torch.rand(2, 4)) if name == "TwoInputs" else eight)
           for name in ("Tied", "Shared", "Reused", "TwoInputs")},
    }


def test_every_model_of_the_other_tests_matches_flop_counter():
    for name, (cls, inputs) in _other_test_models().items():
        torch.manual_seed(0)
        model = cls().eval()
        assert rs.count(model, inputs).macs == pytest.approx(oracle_macs(model, inputs), rel=0.01), name
