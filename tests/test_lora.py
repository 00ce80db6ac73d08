"""LoRA adapters: layers, model API, files (PEFT layout), several adapters, training, errors."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from torch import nn

from rankshrink import lora
from rankshrink.errors import ConfigError, FileFormatError, LayerError
from rankshrink.lora import LoraConfig


def _randomize_adapters(model: nn.Module, std: float = 0.05, seed: int = 1) -> None:
    """Give adapters non-zero A and B (a fresh adapter has B = 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in lora.lora_layers(model).values():
            for name in w.adapter_names:
                w.lora_A[name].copy_(torch.randn(w.lora_A[name].shape, generator=gen) * std)
                w.lora_B[name].copy_(torch.randn(w.lora_B[name].shape, generator=gen) * std)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=2, dilation=2)
        self.c2 = nn.Conv2d(8, 6, (3, 2), stride=(1, 2), padding=(1, 0), padding_mode="reflect")
        self.c3 = nn.Conv1d(6, 5, 3, padding="same", bias=False)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = x.flatten(2)  # (N, 6, L)
        x = torch.relu(self.c3(x))
        return self.head(x.mean(-1))


class MLP(nn.Module):
    def __init__(self, sizes=(16, 12, 10, 4)):
        super().__init__()
        self.fc1 = nn.Linear(sizes[0], sizes[1])
        self.fc2 = nn.Linear(sizes[1], sizes[2])
        self.out = nn.Linear(sizes[2], sizes[3])

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP()


@pytest.fixture
def convnet():
    torch.manual_seed(0)
    return ConvNet().eval()


def _factorized_model():
    from rankshrink.methods import factorize

    torch.manual_seed(0)
    lin = factorize(nn.Linear(16, 12), "svd", 4)
    conv = factorize(nn.Conv2d(3, 8, 3, stride=2, padding=1), "weight", 3)
    tuck = factorize(nn.Conv2d(3, 8, 3, padding=1), "tucker2", (4, 2))
    return nn.ModuleDict({"lin": lin, "conv": conv, "tuck": tuck})


# ---------------------------------------------------------------------------- fresh adapters change nothing
def test_fresh_adapter_identical_outputs_linear(mlp):
    x = torch.randn(7, 16)
    adapted = lora.add_adapters(mlp, r=3, lora_alpha=6, target_modules=["fc1", "fc2", "out"])
    assert torch.equal(adapted(x), mlp(x))
    # 3-D input (batch, seq, features) works too
    x3 = torch.randn(2, 5, 16)
    assert torch.equal(adapted(x3), mlp(x3))
    # A is initialised (Kaiming-uniform), B is zero
    w = adapted.fc1
    assert w.lora_A["default"].abs().sum() > 0 and torch.count_nonzero(w.lora_B["default"]) == 0
    # the user's model is untouched (a copy was adapted)
    assert isinstance(mlp.fc1, nn.Linear) and not lora.lora_layers(mlp)


def test_fresh_adapter_identical_outputs_conv(convnet):
    x = torch.randn(2, 3, 11, 12)
    for init in (True, "gaussian"):
        adapted = lora.add_adapters(convnet, r=2, lora_alpha=4, target_modules=["c1", "c2", "c3"],
                                    init_lora_weights=init)
        assert type(adapted.c1).__name__ == "ConvWithLoRA" and type(adapted.c3).__name__ == "ConvWithLoRA"
        torch.testing.assert_close(adapted(x), convnet(x), rtol=0, atol=0)
    assert adapted.c1.lora_A["default"].shape == (2, 3, 3, 3)
    assert adapted.c1.lora_B["default"].shape == (8, 2, 1, 1)
    assert adapted.c3.lora_A["default"].shape == (2, 6, 3)
    assert adapted.c3.lora_B["default"].shape == (5, 2, 1)


def test_fresh_adapter_identical_outputs_factorized():
    model = _factorized_model()
    adapted = lora.add_adapters(model, r=2, lora_alpha=2, target_modules="Factorized")
    assert set(lora.lora_layers(adapted)) == {"lin", "conv", "tuck"}
    x, img = torch.randn(3, 16), torch.randn(2, 3, 9, 9)
    assert torch.equal(adapted["lin"](x), model["lin"](x))
    assert torch.equal(adapted["conv"](img), model["conv"](img))
    assert torch.equal(adapted["tuck"](img), model["tuck"](img))


# ---------------------------------------------------------------------------- the adapter computes W + s·B·A
def test_conv_adapter_equals_dense_kernel_update(convnet):
    adapted = lora.add_adapters(convnet, r=2, lora_alpha=3, target_modules="Conv2d")
    _randomize_adapters(adapted)
    x = torch.randn(2, 3, 11, 12)
    for name in ("c1", "c2"):
        w = getattr(adapted, name)
        base = w.base_layer
        dense = copy.deepcopy(base)
        with torch.no_grad():
            dense.weight += w.delta_weight("default")
        inp = x if name == "c1" else torch.relu(adapted.c1(x))
        torch.testing.assert_close(w(inp), dense(inp), atol=1e-5, rtol=1e-5)


def test_factorized_adapter_matches_dense_update_and_merges_exactly():
    model = _factorized_model()
    adapted = lora.add_adapters(model, r=2, lora_alpha=2, target_modules=["lin", "conv"])
    _randomize_adapters(adapted)
    x, img = torch.randn(3, 16), torch.randn(2, 3, 9, 9)
    w = adapted["lin"]
    expected = nn.functional.linear(x, model["lin"].dense_weight() + w.delta_weight("default"),
                                    model["lin"].bias)
    torch.testing.assert_close(w(x), expected, atol=1e-5, rtol=1e-5)
    before_lin, before_conv = adapted["lin"](x), adapted["conv"](img)
    dense_before = model["conv"].dense_weight()
    lora.merge_adapters(adapted)
    assert adapted["lin"].base_layer.rank == 4 + 2  # the rank grows by r: still factorized
    torch.testing.assert_close(adapted["lin"](x), before_lin, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapted["conv"](img), before_conv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapted["conv"].base_layer.dense_weight(),
                               dense_before + adapted["conv"].delta_weight("default"), atol=1e-5, rtol=1e-5)
    lora.unmerge_adapters(adapted)  # slicing back: bit-exact
    for key in ("lin", "conv"):
        for p, q in zip(adapted[key].base_layer.parameters(), model[key].parameters()):
            assert torch.equal(p, q)
    plain = lora.remove_adapters(adapted, merge=True)
    assert type(plain["lin"]).__name__ == "Factorized" and plain["lin"].rank == 6
    torch.testing.assert_close(plain["lin"](x), before_lin, atol=1e-5, rtol=1e-5)


def test_factorized_tucker_cannot_merge_and_no_pissa():
    model = _factorized_model()
    adapted = lora.add_adapters(model, r=2, lora_alpha=2, target_modules=["tuck"])
    with pytest.raises(LayerError, match="tuck.*tucker2"):
        lora.merge_adapters(adapted)
    with pytest.raises(LayerError, match="PiSSA.*lin"):
        lora.add_adapters(model, r=2, lora_alpha=2, target_modules=["lin"], init_lora_weights="pissa")


# ---------------------------------------------------------------------------- merge / unmerge / remove
def test_merge_unmerge_round_trip(mlp, convnet):
    for model, x in ((mlp, torch.randn(6, 16)), (convnet, torch.randn(2, 3, 11, 12))):
        adapted = lora.add_adapters(model, r=2, lora_alpha=4, target_modules="all")
        _randomize_adapters(adapted)
        originals = {k: w.base_layer.weight.detach().clone() for k, w in lora.lora_layers(adapted).items()}
        unmerged_out = adapted(x)
        lora.merge_adapters(adapted)
        for k, w in lora.lora_layers(adapted).items():
            assert w.merged_adapters == ["default"]
            torch.testing.assert_close(w.base_layer.weight, originals[k] + w.delta_weight("default"),
                                       atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(adapted(x), unmerged_out, atol=1e-5, rtol=1e-5)
        lora.unmerge_adapters(adapted)
        for k, w in lora.lora_layers(adapted).items():
            assert (w.base_layer.weight - originals[k]).abs().max() < 1e-6
        torch.testing.assert_close(adapted(x), unmerged_out, atol=1e-5, rtol=1e-5)
        plain = lora.remove_adapters(adapted, merge=True)
        assert not lora.lora_layers(plain) and lora.lora_layers(adapted)
        torch.testing.assert_close(plain(x), unmerged_out, atol=1e-5, rtol=1e-5)
        original = lora.remove_adapters(adapted, merge=False)
        torch.testing.assert_close(original(x), model(x), atol=1e-6, rtol=0)
        assert set(original.state_dict()) == set(model.state_dict())


# ---------------------------------------------------------------------------- PiSSA and rsLoRA
def test_pissa_init_is_top_r_svd_and_residual(mlp, convnet):
    adapted = lora.add_adapters(mlp, r=3, lora_alpha=6, target_modules=["fc1"], init_lora_weights="pissa")
    w = adapted.fc1
    W = mlp.fc1.weight.detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    top = (U[:, :3] * S[:3]) @ Vh[:3]
    delta = w.delta_weight("default").double()
    torch.testing.assert_close(delta, top, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.base_layer.weight.double() + delta, W, atol=1e-6, rtol=0)
    x = torch.randn(5, 16)
    torch.testing.assert_close(adapted(x), mlp(x), atol=1e-5, rtol=1e-5)
    # removing the adapter gives the original layer back
    torch.testing.assert_close(lora.remove_adapters(adapted).fc1.weight, mlp.fc1.weight, atol=1e-6, rtol=0)
    # conv: the top-r part of the (out, in·k·k) kernel matrix
    ac = lora.add_adapters(convnet, r=2, lora_alpha=2, target_modules=["c1"], init_lora_weights="pissa")
    K = convnet.c1.weight.detach().double().reshape(8, -1)
    U, S, Vh = torch.linalg.svd(K, full_matrices=False)
    torch.testing.assert_close(ac.c1.delta_weight("default").double().reshape(8, -1),
                               (U[:, :2] * S[:2]) @ Vh[:2], atol=1e-5, rtol=1e-5)
    img = torch.randn(2, 3, 11, 12)
    torch.testing.assert_close(ac(img), convnet(img), atol=1e-5, rtol=1e-5)


def test_rslora_scaling(mlp):
    plain = lora.add_adapters(mlp, r=4, lora_alpha=8, target_modules=["fc1"])
    rs = lora.add_adapters(mlp, r=4, lora_alpha=8, target_modules=["fc1"], use_rslora=True)
    assert plain.fc1.scaling["default"] == pytest.approx(2.0)
    assert rs.fc1.scaling["default"] == pytest.approx(8 / math.sqrt(4)) == pytest.approx(4.0)
    assert LoraConfig(r=9, lora_alpha=6, use_rslora=True).scaling == pytest.approx(2.0)


# ---------------------------------------------------------------------------- parameter counts
def test_trainable_parameter_counts_match_formulas(mlp, convnet):
    adapted = lora.add_adapters(mlp, r=3, lora_alpha=3, target_modules=["fc1", "out"])
    total_base = sum(p.numel() for p in mlp.parameters())
    expected = 3 * (16 + 12) + 3 * (10 + 4)
    count = lora.count_parameters(adapted)
    assert (count.trainable, count.adapter, count.total) == (expected, expected, total_base + expected)
    assert count.trainable_percent == pytest.approx(100 * expected / (total_base + expected))
    assert all(not p.requires_grad for n, p in adapted.named_parameters() if "lora_" not in n)
    ac = lora.add_adapters(convnet, r=2, lora_alpha=2, target_modules=["c1", "c3"])
    expected = 2 * (3 * 3 * 3 + 8) + 2 * (6 * 3 + 5)
    assert lora.count_parameters(ac).trainable == expected


# ---------------------------------------------------------------------------- targets
def test_target_selection_by_name_type_regex(mlp, convnet):
    assert lora.find_targets(mlp, ["fc1", "fc2"]) == ["fc1", "fc2"]
    assert lora.find_targets(mlp, "Linear") == ["fc1", "fc2", "out"]
    assert lora.find_targets(mlp, r"fc\d") == ["fc1", "fc2"]
    assert lora.find_targets(mlp, re.compile(r"f.*")) == ["fc1", "fc2"]
    assert lora.find_targets(mlp, nn.Linear) == ["fc1", "fc2", "out"]
    assert lora.find_targets(convnet, ["Conv1d", "head"]) == ["c3", "head"]
    nested = nn.Sequential(mlp)
    assert lora.find_targets(nested, ["fc2"]) == ["0.fc2"]  # suffix match, as in PEFT


# ---------------------------------------------------------------------------- several adapters
def test_multiple_adapters_switch_disable_combine(mlp):
    x = torch.randn(5, 16)
    model = lora.add_adapters(mlp, r=2, lora_alpha=2, target_modules=["fc1", "fc2"], name="alice")
    model = lora.add_adapters(model, r=3, lora_alpha=6, target_modules=["fc2", "out"], name="bob", inplace=True)
    _randomize_adapters(model)
    assert lora.adapter_names(model) == ["alice", "bob"] and lora.active_adapters(model) == ["bob"]

    def expected(deltas):
        ref = copy.deepcopy(mlp)
        with torch.no_grad():
            for layer, d in deltas:
                getattr(ref, layer).weight += d
        return ref(x)

    d = {(k, n): w.delta_weight(n) for k, w in lora.lora_layers(model).items() for n in w.adapter_names}
    torch.testing.assert_close(model(x), expected([("fc2", d["fc2", "bob"]), ("out", d["out", "bob"])]),
                               atol=1e-5, rtol=1e-5)
    lora.set_adapter(model, "alice")
    torch.testing.assert_close(model(x), expected([("fc1", d["fc1", "alice"]), ("fc2", d["fc2", "alice"])]),
                               atol=1e-5, rtol=1e-5)
    lora.set_adapter(model, ["alice", "bob"])  # both at once: updates add up
    both = expected([("fc1", d["fc1", "alice"]), ("fc2", d["fc2", "alice"] + d["fc2", "bob"]),
                     ("out", d["out", "bob"])])
    torch.testing.assert_close(model(x), both, atol=1e-5, rtol=1e-5)
    with lora.adapters_disabled(model):
        assert torch.equal(model(x), mlp(x))
    torch.testing.assert_close(model(x), both, atol=1e-5, rtol=1e-5)
    lora.disable_adapters(model)
    assert torch.equal(model(x), mlp(x))
    lora.enable_adapters(model)
    # combine: weighted sum of the deltas, checked against hand computation
    lora.combine_adapters(model, {"alice": 0.25, "bob": -1.5}, name="mix")
    assert lora.active_adapters(model) == ["mix"]
    assert model.fc2.r["mix"] == 5 and model.fc1.r["mix"] == 2
    for layer, names in (("fc1", ["alice"]), ("fc2", ["alice", "bob"]), ("out", ["bob"])):
        hand = sum(({"alice": 0.25, "bob": -1.5}[n] * d[layer, n] for n in names), torch.zeros(()))
        torch.testing.assert_close(getattr(model, layer).delta_weight("mix"), hand, atol=1e-6, rtol=1e-5)
    mix = expected([("fc1", 0.25 * d["fc1", "alice"]), ("fc2", 0.25 * d["fc2", "alice"] - 1.5 * d["fc2", "bob"]),
                    ("out", -1.5 * d["out", "bob"])])
    torch.testing.assert_close(model(x), mix, atol=1e-5, rtol=1e-5)
    lora.delete_adapter(model, "mix")
    assert lora.adapter_names(model) == ["alice", "bob"]


# ---------------------------------------------------------------------------- files
def test_save_load_round_trip_and_peft_convention(tmp_path, mlp, convnet):
    adapted = lora.add_adapters(mlp, r=3, lora_alpha=6, target_modules=["fc1", "out"], lora_dropout=0.1)
    _randomize_adapters(adapted)
    adapted.eval()
    out_dir = lora.save_adapter(adapted, tmp_path / "a")
    assert sorted(p.name for p in out_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    from safetensors.torch import load_file

    tensors = load_file(str(out_dir / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "base_model.model.fc1.lora_A.weight": (3, 16), "base_model.model.fc1.lora_B.weight": (12, 3),
        "base_model.model.out.lora_A.weight": (3, 10), "base_model.model.out.lora_B.weight": (4, 3)}
    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 3 and cfg["lora_alpha"] == 6
    assert cfg["target_modules"] == ["fc1", "out"] and cfg["lora_dropout"] == 0.1
    assert cfg["use_rslora"] is False and cfg["bias"] == "none" and cfg["fan_in_fan_out"] is False
    assert cfg["init_lora_weights"] is True and "fingerprint" in cfg["rankshrink"]
    loaded = lora.load_adapter(copy.deepcopy(mlp), out_dir).eval()
    x = torch.randn(4, 16)
    assert torch.equal(loaded(x), adapted(x))
    # conv adapters: PEFT's conv shapes (r, in, kh, kw) and (out, r, 1, 1)
    ac = lora.add_adapters(convnet, r=2, lora_alpha=2, target_modules=["c1", "c3"])
    _randomize_adapters(ac)
    lora.save_adapter(ac, tmp_path / "c")
    shapes = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "c" / "adapter_model.safetensors")).items()}
    assert shapes["base_model.model.c1.lora_A.weight"] == (2, 3, 3, 3)
    assert shapes["base_model.model.c1.lora_B.weight"] == (8, 2, 1, 1)
    assert shapes["base_model.model.c3.lora_B.weight"] == (5, 2, 1)
    img = torch.randn(2, 3, 11, 12)
    assert torch.equal(lora.load_adapter(convnet, tmp_path / "c")(img), ac(img))


def test_pissa_and_combined_adapters_save_as_plain_lora(tmp_path, mlp):
    adapted = lora.add_adapters(mlp, r=2, lora_alpha=4, target_modules=["fc1", "fc2"], init_lora_weights="pissa")
    _randomize_adapters(adapted)  # "trained"
    lora.save_adapter(adapted, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8  # rank 2r onto the original base, same scale
    x = torch.randn(5, 16)
    torch.testing.assert_close(lora.load_adapter(mlp, tmp_path / "p")(x), adapted(x), atol=1e-5, rtol=1e-5)
    two = lora.add_adapters(mlp, r=2, lora_alpha=2, target_modules=["fc1"], name="a")
    two = lora.add_adapters(two, r=1, lora_alpha=3, target_modules=["fc1", "out"], name="b", inplace=True)
    _randomize_adapters(two)
    lora.combine_adapters(two, {"a": 1.0, "b": 0.5}, "ab")
    lora.save_adapter(two, tmp_path / "ab", name="ab")
    cfg = json.loads((tmp_path / "ab" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {"out": 1} and cfg["r"] == 3
    torch.testing.assert_close(lora.load_adapter(mlp, tmp_path / "ab")(x), two(x), atol=1e-5, rtol=1e-5)


def test_one_base_many_customers(tmp_path, mlp):
    x = torch.randn(3, 16)
    outputs = {}
    for i, customer in enumerate(("acme", "globex")):
        adapted = lora.add_adapters(mlp, r=2, lora_alpha=2, target_modules="Linear", seed=i)
        _randomize_adapters(adapted, seed=10 + i)
        outputs[customer] = adapted(x)
        lora.save_adapter(adapted, tmp_path / customer)
    served = lora.load_adapter(mlp, tmp_path / "acme", name="acme")
    lora.load_adapter(served, tmp_path / "globex", name="globex", inplace=True)
    for customer in ("acme", "globex"):
        lora.set_adapter(served, customer)
        assert torch.equal(served(x), outputs[customer])


def test_loading_onto_wrong_base_fails_clearly(tmp_path, mlp):
    adapted = lora.add_adapters(mlp, r=2, lora_alpha=2, target_modules=["fc1", "fc2"])
    lora.save_adapter(adapted, tmp_path / "a")
    other = MLP()  # same shapes, other weights
    with pytest.raises(FileFormatError, match=r"different base model.*fc1, fc2.*check_fingerprint=False"):
        lora.load_adapter(other, tmp_path / "a")
    assert lora.lora_layers(lora.load_adapter(other, tmp_path / "a", check_fingerprint=False))
    wider = MLP(sizes=(16, 20, 10, 4))
    with pytest.raises(FileFormatError,
                       match=r"does not fit layer 'fc1'.*lora_B \(12, 2\).*needs \(2, 16\) and \(20, 2\)"):
        lora.load_adapter(wider, tmp_path / "a")
    with pytest.raises(FileFormatError, match="layer 'fc1', which Sequential does not have"):
        lora.load_adapter(nn.Sequential(nn.Linear(16, 12)), tmp_path / "a")
    with pytest.raises(FileFormatError, match="no adapter_config.json"):
        lora.load_adapter(mlp, tmp_path)
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(FileFormatError, match="not a readable safetensors"):
        lora.load_adapter(mlp, tmp_path / "a")


# ---------------------------------------------------------------------------- bad input
def test_bad_inputs_give_specific_errors(mlp):
    with pytest.raises(LayerError, match=r"'fc9' matches no layer.*fc1 \(Linear 16→12\).*out \(Linear 10→4\)"):
        lora.add_adapters(mlp, r=2, lora_alpha=2, target_modules=["fc1", "fc9"])
    with pytest.raises(LayerError, match=r"rank 13 does not fit layer 'fc1'.*1\.\.12.*at most 12"):
        lora.add_adapters(mlp, r=13, lora_alpha=2, target_modules=["fc1"])
    for alpha in (0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="lora_alpha must be a positive number"):
            lora.add_adapters(mlp, r=2, lora_alpha=alpha, target_modules=["fc1"])
    with pytest.raises(ConfigError, match="rank r must be a positive integer"):
        LoraConfig(r=0)
    with pytest.raises(ConfigError, match="lora_dropout"):
        LoraConfig(lora_dropout=1.5)
    with pytest.raises(ConfigError, match="no LoRA target"):
        lora.add_adapters(mlp, r=2)
    seq = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(LayerError, match=r"selects layer '1', which cannot take an adapter.*sub-layers: 1\.0"):
        lora.add_adapters(seq, r=1, lora_alpha=1, target_modules=["1"])
    adapted = lora.add_adapters(mlp, r=2, lora_alpha=2, target_modules=["fc1"])
    with pytest.raises(LayerError, match="not merged into layer 'fc1'.*merge_adapters"):
        lora.unmerge_adapters(adapted, "default")
    with pytest.raises(LayerError, match="nothing to unmerge"):
        lora.unmerge_adapters(adapted)
    lora.merge_adapters(adapted)
    with pytest.raises(LayerError, match="already merged into layer 'fc1'.*unmerge_adapters"):
        lora.merge_adapters(adapted)
    with pytest.raises(LayerError, match="no adapter named 'nope'.*'default'"):
        lora.set_adapter(adapted, "nope")
    with pytest.raises(LayerError, match="already has an adapter named 'default'"):
        lora.add_adapters(adapted, r=2, lora_alpha=2, target_modules=["fc1"])
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(LayerError, match="groups=2"):
        lora.add_adapters(grouped, r=1, lora_alpha=1, target_modules=["0"])


# ---------------------------------------------------------------------------- training
@pytest.mark.slow
def test_lora_training_improves_accuracy_and_keeps_base_bits():
    from torch.utils.data import TensorDataset

    from rankshrink.data import load_digits_splits
    from rankshrink.metrics import accuracy
    from rankshrink.models import MnistMLP
    from rankshrink.train import train

    splits = load_digits_splits()

    def transposed(ds):  # a domain shift: every digit mirrored across its diagonal
        x, y = ds.tensors
        return TensorDataset(x.transpose(-1, -2).contiguous(), y)

    torch.manual_seed(0)
    base = MnistMLP(num_features=64)
    train(base, splits.train, epochs=5, lr=2e-3, progress=False, seed=0)
    shifted_train, shifted_test = transposed(splits.train), transposed(splits.test)
    base_acc = accuracy(base, shifted_test)
    assert base_acc < 0.4
    adapted = lora.add_adapters(base, r=4, lora_alpha=8, target_modules="Linear")
    before = {k: v.clone() for k, v in adapted.state_dict().items() if "lora_" not in k}
    result = lora.train_adapter(adapted, shifted_train, epochs=5, lr=1e-2, progress=False, seed=0)
    assert result.epochs_run == 5
    lora_acc = accuracy(adapted, shifted_test)
    assert lora_acc > base_acc + 0.4, (base_acc, lora_acc)
    after = {k: v for k, v in adapted.state_dict().items() if "lora_" not in k}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    merged = lora.remove_adapters(adapted, merge=True)
    assert accuracy(merged, shifted_test) == pytest.approx(lora_acc, abs=1e-6)
    with lora.adapters_disabled(adapted):  # the base is still there, unchanged
        assert accuracy(adapted, splits.test) == accuracy(base, splits.test)


def test_dropout_on_adapter_input_only_in_training(mlp):
    adapted = lora.add_adapters(mlp, r=2, lora_alpha=2, target_modules=["fc1"], lora_dropout=0.5)
    _randomize_adapters(adapted, std=0.5)
    x = torch.randn(64, 16)
    adapted.eval()
    assert torch.equal(adapted(x), adapted(x))
    adapted.train()
    torch.manual_seed(0)
    a = adapted.fc1(x)
    torch.manual_seed(1)
    b = adapted.fc1(x)
    assert not torch.allclose(a, b)
    # the base path never sees dropout: with the adapter disabled training mode is deterministic
    with lora.adapters_disabled(adapted):
        assert torch.equal(adapted.fc1(x), mlp.fc1(x))


def test_files_interoperate_with_peft(tmp_path):
    """Round trip through Hugging Face PEFT itself when it is installed (it is not a dependency).

    Plain convolutions only: PEFT's conv adapter ignores dilation and padding_mode, so on
    such layers it computes another function than the merged kernel (rankshrink honours them).
    """
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 3, padding=1),
                        nn.Flatten(), nn.Linear(4 * 6, 5)).eval()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = net

        def forward(self, x):
            h = self.body[1](self.body[0](x)).mean(-1)  # (N, 4, 6)
            return self.body[4](self.body[3](self.body[2](h)))

    model = Net().eval()
    img = torch.randn(2, 3, 11, 12)
    ours = lora.add_adapters(model, r=2, lora_alpha=4, target_modules="all", use_rslora=True)
    _randomize_adapters(ours)
    lora.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(theirs(img), ours(img), atol=1e-6, rtol=1e-6)
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["body.0", "body.4"], init_lora_weights="gaussian")
    pm = peft.get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(str(tmp_path / "theirs"))
    loaded = lora.load_adapter(model, tmp_path / "theirs").eval()
    torch.testing.assert_close(loaded(img), pm.eval()(img), atol=1e-6, rtol=1e-6)


def test_gradients_match_dense_reference(mlp, convnet):
    """The fused in-place forward gives the same gradients as F.linear/conv with W + s·B·A."""
    cases = ((mlp, "fc1", torch.randn(3, 4, 16), nn.functional.linear, {}),
             (convnet, "c1", torch.randn(2, 3, 9, 9), nn.functional.conv2d,
              dict(stride=2, padding=2, dilation=2)))
    for model, layer, x, op, kw in cases:
        adapted = lora.add_adapters(model, r=2, lora_alpha=3, target_modules=[layer])
        _randomize_adapters(adapted, std=0.3)
        w = getattr(adapted, layer)
        A, B, s = w.lora_A["default"], w.lora_B["default"], w.scaling["default"]
        x1 = x.clone().requires_grad_(True)
        w(x1).square().sum().backward()
        got = (A.grad.clone(), B.grad.clone(), x1.grad.clone())
        A.grad = B.grad = None
        x2 = x.clone().requires_grad_(True)
        out_c, r = B.shape[0], B.shape[1]
        delta = s * (B.reshape(out_c, r) @ A.reshape(r, -1)).reshape(w.base_layer.weight.shape)
        op(x2, w.base_layer.weight + delta, w.base_layer.bias, **kw).square().sum().backward()
        for g, e in zip(got, (A.grad, B.grad, x2.grad)):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
