"""Model surgery: rankshrink.surgery (apply, save, load, validate_plan, layer lookup)."""

import copy
import json

import pytest
import torch
from torch import nn

import rankshrink as rs
from rankshrink.errors import FileFormatError, LayerError, PlanError
from rankshrink.factorized import Factorized
from rankshrink.layers import aliases, factorizable_layers, get_layer
from rankshrink.surgery import PLAN_FILE, WEIGHTS_FILE, replace_layer, validate_plan


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x)))


class Net(nn.Module):
    """Sequential, ModuleDict, ModuleList and attribute nesting, plus a depthwise conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.block = Block()
        self.branches = nn.ModuleDict({"left": nn.Conv2d(8, 6, 1), "right": nn.Conv2d(8, 6, (1, 3), padding=(0, 1))})
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.heads = nn.ModuleList([nn.Linear(12 * 16, 10), nn.Linear(10, 4)])

    def forward(self, x):
        h = self.block(self.stem(x))
        h = torch.cat([self.branches["left"](h), self.branches["right"](h)], 1)
        h = self.dw(h).flatten(1)
        return self.heads[1](torch.relu(self.heads[0](h)))


def net():
    torch.manual_seed(0)
    return Net().eval()


X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))

FULL_PLAN = {"stem.0": ("tucker2", (4, 2)), "block.conv": ("spatial", 6), "branches.left": ("weight", 3),
             "branches.right": ("cp", 3), "heads.0": ("svd", 5), "heads.1": ("svd", 2)}


def structure(model):
    return [(name, type(m).__name__, repr(m)) for name, m in model.named_modules()]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, structure(model)


def assert_unchanged(model, before):
    state, struct = before
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) and after[k].dtype == state[k].dtype for k in state)
    assert structure(model) == struct


def test_apply_leaves_input_untouched_and_builds_right_structure():
    model = net()
    model.train()  # BatchNorm running stats must not move either
    before = snapshot(model)
    small = rs.apply(model, rs.Plan.from_mapping(FULL_PLAN))
    assert_unchanged(model, before)
    assert small is not model and model.training == small.training
    for name, (method, _rank) in FULL_PLAN.items():
        block = small.get_submodule(name)
        assert isinstance(block, Factorized) and block.method == method
        assert block.geometry == rs.factorized.layer_geometry(model.get_submodule(name))
    assert isinstance(small.branches, nn.ModuleDict) and isinstance(small.heads, nn.ModuleList)
    assert isinstance(small.block.norm, nn.BatchNorm2d) and small.dw.groups == 12
    assert small.block.norm.weight is not model.block.norm.weight  # a copy, not shared storage
    assert len(small.stem[0]) == 3 and len(small.branches["right"]) == 4 and len(small.heads[0]) == 2
    small.eval()
    model.eval()
    assert small(X).shape == model(X).shape == (2, 4)


def test_apply_accepts_dict_and_full_rank_is_exact():
    model = net().double()
    plan = {"stem.0": ("weight", 8), "block.conv": ("tucker2", 8), "heads.1": ("svd", 4)}
    small = rs.apply(model, plan)
    x = X.double()
    assert torch.allclose(small(x), model(x), rtol=1e-9, atol=1e-10)


def test_apply_inplace():
    model = net()
    out = rs.apply(model, {"heads.1": ("svd", 2)}, inplace=True)
    assert out is model and isinstance(model.heads[1], Factorized)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = self.a            # the same module under two names
        self.seq = nn.Sequential(self.a, nn.ReLU())
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.b(self.seq(x)))


def test_shared_module_replaced_everywhere_by_one_block():
    model = Shared()
    assert sorted(aliases(model)[id(model.a)]) == ["a", "b", "seq.0"]
    small = rs.apply(model, {"b": ("svd", 3)})
    assert isinstance(small.a, Factorized)
    assert small.a is small.b is small.seq[0]
    assert small.out is not model.out
    with pytest.raises(PlanError, match="same shared module"):
        rs.apply(model, {"a": ("svd", 3), "seq.0": ("svd", 2)})
    full = rs.apply(model.double(), {"a": ("svd", 6)})
    x = torch.randn(3, 6, dtype=torch.float64)
    assert torch.allclose(full(x), model(x), atol=1e-12)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.encode = nn.Linear(6, 6)
        self.decode = nn.Linear(6, 6)
        self.decode.weight = self.encode.weight  # tied parameter, different modules

    def forward(self, x):
        return self.decode(self.encode(x))


def test_tied_weights_refused():
    model = Tied()
    for name in ("encode", "decode"):
        with pytest.raises(LayerError, match="tied weights") as info:
            rs.apply(model, {name: ("svd", 2)})
        other = "decode" if name == "encode" else "encode"
        assert f"layer '{name}'" in str(info.value) and other in str(info.value)


@pytest.mark.parametrize("plan,error,message", [
    ({"stem.1x": ("svd", 2)}, PlanError, "does not exist"),
    ({"heads.2": ("svd", 2)}, PlanError, "Did you mean 'heads.1', 'heads.0'"),
    ({"block.cnv": ("weight", 2)}, PlanError, "Did you mean 'block.conv'"),
    ({"branches.lft": ("weight", 2)}, PlanError, "Did you mean 'branches.left'"),
    ({"stem.1": ("svd", 2)}, LayerError, r"layer 'stem.1' \(ReLU\) cannot be factorized"),
    ({"block.norm": ("svd", 2)}, LayerError, r"layer 'block.norm' \(BatchNorm2d\) cannot be factorized"),
    ({"dw": ("weight", 2)}, LayerError, "layer 'dw'.*depthwise"),
    ({"block": ("weight", 2)}, LayerError, "layer 'block' .Block. cannot be factorized"),
    ({"heads.0": ("weight", 2)}, LayerError, "layer 'heads.0': method 'weight' does not apply to Linear"),
    ({"stem.0": ("svd", 2)}, LayerError, "layer 'stem.0': method 'svd' does not apply to Conv2d"),
    ({"heads.1": ("svd", 5)}, LayerError, r"layer 'heads.1'.*rank 5 is outside 1\.\.4"),
    ({"block.conv": ("spatial", 25)}, LayerError, r"layer 'block.conv'.*outside 1\.\.24"),
    ({"stem.0": ("tucker2", (9, 1))}, LayerError, "layer 'stem.0'.*tucker2"),
    ({"stem.0": ("tucker2", 9)}, LayerError, "layer 'stem.0'.*tucker2"),
])
def test_bad_plan_entries(plan, error, message):
    model = net()
    before = snapshot(model)
    full = {"heads.0": ("svd", 3), **plan}  # a good entry first: nothing may be applied
    with pytest.raises(error, match=message):
        rs.apply(model, full)
    with pytest.raises(error, match=message):
        validate_plan(model, rs.Plan.from_mapping(full))
    assert_unchanged(model, before)


def test_rank_zero_rejected_when_plan_is_built():
    with pytest.raises(PlanError, match="layer 'heads.0'.*positive integer"):
        rs.apply(net(), {"heads.0": ("svd", 0)})
    with pytest.raises(PlanError, match="expected a rankshrink Plan"):
        validate_plan(net(), [("heads.0", "svd", 2)])


def test_validate_plan_returns_normalised_ranks():
    ranks = validate_plan(net(), rs.Plan.from_mapping({"stem.0": ("tucker2", 5), "heads.0": ("svd", 3)}))
    assert ranks == {"stem.0": (5, 3), "heads.0": 3}


def test_lookup_helpers():
    model = net()
    assert get_layer(model, "branches.right") is model.branches["right"]
    with pytest.raises(PlanError, match="Factorizable layers: stem.0, block.conv"):
        get_layer(model, "nothing")
    with pytest.raises(PlanError):
        get_layer(model, "")
    names = [n for n, _ in factorizable_layers(model)]
    assert names == ["stem.0", "block.conv", "branches.left", "branches.right", "heads.0", "heads.1"]
    skipped = dict(rs.skipped_layers(model))
    assert set(skipped) == {"block.norm", "dw"} and "depthwise" in skipped["dw"]
    small = rs.apply(model, {"branches.right": ("cp", 2)})
    assert "branches.right.1" not in dict(rs.skipped_layers(small))  # CP's depthwise factors are not "skipped"
    new = nn.Identity()
    replace_layer(small, "heads.1", new)
    replace_layer(small, "branches.left", new)
    replace_layer(small, "block.conv", new)
    assert small.heads[1] is small.branches["left"] is small.block.conv is new


def test_save_load_round_trip_bit_identical(tmp_path):
    model = net()
    plan = rs.Plan.from_mapping(FULL_PLAN, metadata={"model": "test"})
    small = rs.apply(model, plan).eval()
    out = rs.save(small, plan, tmp_path / "out")
    assert (out / WEIGHTS_FILE).is_file() and (out / PLAN_FILE).is_file()
    assert rs.Plan.load(out / PLAN_FILE) == plan
    for factory in (Net, model):
        before = snapshot(model)
        again = rs.load(factory, out)
        assert_unchanged(model, before)
        assert not again.training
        assert structure(again) == structure(small)
        assert torch.equal(again(X), small(X))
        for key, value in small.state_dict().items():
            assert torch.equal(again.state_dict()[key], value)


def test_save_load_shared_module(tmp_path):
    model = Shared()
    plan = rs.Plan.from_mapping({"a": ("svd", 3)})
    small = rs.apply(model, plan)
    rs.save(small, plan, tmp_path)
    again = rs.load(Shared, tmp_path)
    assert again.a is again.b is again.seq[0]
    x = torch.randn(2, 6)
    assert torch.equal(again(x), small(x))


def test_save_refuses_non_empty_dir_without_force(tmp_path):
    small = rs.apply(net(), {"heads.1": ("svd", 2)})
    plan = rs.Plan.from_mapping({"heads.1": ("svd", 2)})
    rs.save(small, plan, tmp_path, extra_files={"report.json": {"ok": True}})
    assert json.loads((tmp_path / "report.json").read_text()) == {"ok": True}
    with pytest.raises(rs.ConfigError, match="not empty"):
        rs.save(small, plan, tmp_path)
    rs.save(small, plan, tmp_path, force=True)


def test_load_errors(tmp_path):
    plan = rs.Plan.from_mapping({"heads.0": ("svd", 3), "stem.0": ("weight", 4)})
    small = rs.apply(net(), plan)
    rs.save(small, plan, tmp_path)
    # plan edited after saving: the weights no longer fit
    rs.Plan.from_mapping({"heads.0": ("svd", 4), "stem.0": ("weight", 4)}).save(tmp_path / PLAN_FILE)
    with pytest.raises(FileFormatError, match=r"'heads.0.0.weight' has shape \(3, 192\) in the file but \(4, 192\)"):
        rs.load(Net, tmp_path)
    # a key missing from the weights
    rs.Plan.from_mapping({"heads.0": ("svd", 3)}).save(tmp_path / PLAN_FILE)
    with pytest.raises(FileFormatError, match="unexpected key 'stem.0.0.weight'"):
        rs.load(Net, tmp_path)
    from rankshrink.files import load_tensors, save_tensors

    state = load_tensors(tmp_path / WEIGHTS_FILE)
    del state["block.norm.running_mean"]
    save_tensors(tmp_path / WEIGHTS_FILE, state)
    plan.save(tmp_path / PLAN_FILE)
    with pytest.raises(FileFormatError, match="missing key 'block.norm.running_mean'"):
        rs.load(Net, tmp_path)
    # not a rankshrink directory / bad factory / corrupt weights
    with pytest.raises(FileFormatError, match="no plan.json"):
        rs.load(Net, tmp_path / "nothing")
    with pytest.raises(PlanError, match="not an nn.Module"):
        rs.load(lambda: "model", tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(FileFormatError, match="safetensors"):
        rs.load(Net, tmp_path)
    # a plan naming a layer this model class lacks
    rs.Plan.from_mapping({"head": ("svd", 3)}).save(tmp_path / PLAN_FILE)
    with pytest.raises(PlanError, match="Did you mean"):
        rs.load(Net, tmp_path)


def test_half_precision_model_apply_save_load(tmp_path):
    model = net().half()
    plan = rs.Plan.from_mapping({"heads.0": ("svd", 3), "block.conv": ("tucker2", 4)})
    small = rs.apply(model, plan)
    assert all(p.dtype == torch.float16 for p in small.parameters())
    rs.save(small, plan, tmp_path)
    again = rs.load(lambda: copy.deepcopy(model), tmp_path)
    for key, value in small.state_dict().items():
        assert torch.equal(again.state_dict()[key], value) and again.state_dict()[key].dtype == value.dtype
