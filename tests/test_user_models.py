"""Your own model and your own data, end to end: compress → load → export for every input form,
BatchNorm folding, tied layers, the sanity checks and the options a new user reaches for.

The models are in ``user_models.py`` (next to this file), trained here on scikit-learn's digits.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import rankshrink as rs
from rankshrink.cli import main
from rankshrink.data import first_batch, load_data, load_digits_splits, splits_from
from rankshrink.errors import ConfigError, DataError
from rankshrink.files import load_tensors, save_tensors
from rankshrink.metrics import accuracy
from rankshrink.search.evaluate import single_threaded
from user_models import ImageAndSide, KeywordSpotter, ResNetish, TiedMLP, side_features

MODELS = Path(__file__).resolve().parent / "user_models.py"
# Tests about something other than latency or ONNX: no latency measurements, no model.onnx (faster, and the
# tiny layers here all run slower factorized on ONNX Runtime, so a latency-aware budget has nothing to pick).
NOT_ABOUT_LATENCY = ("--ignore-latency", "--no-export")
pytestmark = pytest.mark.slow  # the models are trained here, and most tests search


def _train(model: nn.Module, splits, epochs: int) -> nn.Module:
    with single_threaded():
        rs.train.train(model, splits.train, val_data=splits.val, epochs=epochs, lr=3e-3, progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    return load_digits_splits()


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits):
    """The digits as .npz files (one input, two positional, two named) and trained models' weights."""
    root = tmp_path_factory.mktemp("own")
    x = torch.cat([digits.train.tensors[0], digits.val.tensors[0], digits.test.tensors[0]])
    y = torch.cat([digits.train.tensors[1], digits.val.tensors[1], digits.test.tensors[1]])
    side = side_features(x)
    np.savez(root / "digits.npz", x=x.numpy(), y=y.numpy())
    np.savez(root / "pair.npz", **{"x.0": x.numpy(), "x.1": side.numpy(), "y": y.numpy()})
    np.savez(root / "named.npz", **{"x.image": x.numpy(), "x.side": side.numpy(), "y": y.numpy()})
    np.savez(root / "unlabelled.npz", x=x.numpy())
    torch.manual_seed(0)
    weights = {}
    named = load_data(str(root / "named.npz"))
    two = _train(ImageAndSide(), named, 8)
    save_tensors(root / "image_and_side.safetensors", two.state_dict())
    weights["image_and_side"] = root / "image_and_side.safetensors"
    plain = load_data(str(root / "digits.npz"))
    for name, cls, epochs in (("resnetish", ResNetish, 6), ("keyword_spotter", KeywordSpotter, 8),
                              ("tied", TiedMLP, 8)):
        torch.manual_seed(0)
        model = _train(cls(), plain, epochs)
        save_tensors(root / f"{name}.safetensors", model.state_dict())
        weights[name] = root / f"{name}.safetensors"
    return root, weights


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKSHRINK_CACHE", str(tmp_path / "cache"))


def _load(factory: str, weights: Path) -> nn.Module:
    from rankshrink.models import load_model_spec

    return load_model_spec(f"{MODELS}:{factory}", weights)


# --------------------------------------------------------------------------- every input form, end to end

@pytest.mark.parametrize("form,data,factory,weights", [
    ("tensor", "digits.npz", "make_resnetish", "resnetish"),
    ("tuple", "pair.npz", "make_image_and_side", "image_and_side"),
    ("dict", "named.npz", "make_image_and_side", "image_and_side"),
])
def test_compress_load_export_for_every_input_form(tmp_path, files, capsys, form, data, factory, weights):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    root, trained = files
    spec = [f"--model={MODELS}:{factory}", "--weights", str(trained[weights]), "--data", str(root / data)]
    out = tmp_path / "small"
    # (svd and weight only: CP's ALS fits dominate the time of a test and add nothing here)
    # (--ignore-latency: these tiny layers all run slower factorized on ONNX Runtime; this test is about inputs)
    assert main(["compress", *spec, "--max-macs", "50%", "--methods", "svd,weight", "--out", str(out),
                 "--quiet", "--ignore-latency"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compressed"]["macs_ratio"] <= 0.5 and summary["metric"] == "accuracy"
    for layer in summary["layers"]:  # never a factorization that costs more than its layer
        assert layer["params"] <= layer["dense_params"] and layer["macs"] <= layer["dense_macs"], layer
    model = rs.load(getattr(__import__("user_models"), factory), out)
    saved = load_tensors(out / "model.safetensors")
    assert all(torch.equal(t, saved[k]) for k, t in model.state_dict().items())
    splits = load_data(str(root / data))
    assert accuracy(model, splits.val) == pytest.approx(summary["compressed"]["accuracy"])
    onnx_path = tmp_path / "small.onnx"
    assert main(["export", *spec, "--compressed", str(out), "--out", str(onnx_path), "--runs", "2",
                 "--batch", "2"]) == 0
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    expected = {"tensor": ["input"], "tuple": ["input_0", "input_1"], "dict": ["image", "side"]}[form]
    assert names == expected
    assert all(i.shape[0] == "batch" for i in session.get_inputs())  # a dynamic batch axis on each input
    inputs = first_batch(splits.test, 5)[0]  # another batch size than exported with
    feed = rs.deploy.onnx.onnx_feed(inputs)
    got = session.run(None, feed)[0]
    with torch.no_grad():
        want = rs.inputs.call_model(model, inputs).numpy()
    assert got.shape == (5, 10) and np.abs(got - want).max() < 1e-4
    capsys.readouterr()


def test_a_gru_model_compresses_and_its_budget_counts_the_gru(tmp_path, files, capsys):
    root, trained = files
    model = _load("make_keyword_spotter", trained["keyword_spotter"])
    splits = load_data(str(root / "digits.npz"))
    cost = rs.count(model, first_batch(splits.val)[0])
    gru = next(row for row in cost.others if row.name == "gru")
    result = rs.compress(model, splits, budget={"macs": 0.7}, progress=False, cache=False)
    counted = rs.count(result.model, first_batch(splits.val)[0])
    assert counted.macs == result.compressed["macs"] <= 0.7 * cost.macs  # the GRU is inside the budget
    assert counted.macs >= gru.macs
    row = next(layer for layer in result.summary()["layers"] if layer["name"] == "gru")
    assert row["method"] == "dense" and "GRU" in row["reason"] and row["macs"] == gru.macs
    with pytest.raises(ConfigError, match=r"GRU layers [0-9,]+ \(gru\)"):
        rs.compress(model, splits, budget={"macs": 0.2}, progress=False, cache=False)


# --------------------------------------------------------------------------- BatchNorm

def _randomise_batchnorm(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=gen))
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=gen))
    return model.eval()


def test_batchnorm_folding_is_exact_and_replayed_by_plans(tmp_path):
    torch.manual_seed(0)
    model = _randomise_batchnorm(ResNetish())
    x = torch.rand(6, 1, 8, 8)
    folds = rs.layers.batchnorm_folds(model)
    assert folds == [("stem.0", "stem.1"), ("conv1", "bn1"), ("conv2", "bn2"), ("depthwise", "bn3")]
    folded = rs.surgery.fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the input model is untouched
    with torch.no_grad():
        assert float((folded(x) - model(x)).abs().max()) <= 1e-5 * float(model(x).abs().max())
    twice = rs.surgery.fold_batchnorm(folded, folds)  # folding again changes nothing
    assert all(torch.equal(a, b) for a, b in zip(twice.state_dict().values(), folded.state_dict().values()))
    plan = rs.Plan.from_mapping({"conv1": ("weight", 8)}).with_folds(folds)
    small = rs.apply(model, plan)
    with torch.no_grad():
        assert float((small(x) - model(x)).abs().max()) <= 1e-4  # weight SVD at full rank is exact
    assert small.conv1.geometry["bias"] is True  # the folded conv took the BatchNorm's shift
    assert rs.Plan.from_json(plan.to_json()).fold_batchnorm == folds
    rs.save(small, plan, tmp_path / "saved")
    again = rs.load(ResNetish, tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(again(x), small(x))


def test_compress_folds_batchnorm_and_apply_reproduces_it(tmp_path, files, capsys):
    root, trained = files
    spec = ["--model", f"{MODELS}:make_resnetish", "--weights", str(trained["resnetish"]),
            "--data", str(root / "digits.npz")]
    out = tmp_path / "c"
    assert main(["compress", *spec, "--max-macs", "0.6", "--methods", "svd,weight", "--out", str(out),
                 "--quiet", *NOT_ABOUT_LATENCY]) == 0
    plan = rs.Plan.load(out / "plan.json")
    assert plan.fold_batchnorm == [("stem.0", "stem.1"), ("conv1", "bn1"), ("conv2", "bn2"), ("depthwise", "bn3")]
    assert "folded 4 BatchNorm" in capsys.readouterr().out
    again = tmp_path / "a"
    assert main(["apply", *spec, "--plan", str(out / "plan.json"), "--out", str(again)]) == 0
    a, b = load_tensors(out / "model.safetensors"), load_tensors(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("bn") for k in a)
    kept = tmp_path / "kept"
    assert main(["compress", *spec, "--max-macs", "0.6", "--methods", "svd,weight", "--out", str(kept), "--quiet",
                 "--no-fold-bn", *NOT_ABOUT_LATENCY]) == 0
    assert rs.Plan.load(kept / "plan.json").fold_batchnorm == []
    assert any(k.startswith("bn1") for k in load_tensors(kept / "model.safetensors"))


# --------------------------------------------------------------------------- tied layers, budgets, big factors

def test_tied_layers_are_listed_as_kept_dense_with_the_reason(tmp_path, files, capsys):
    root, trained = files
    spec = ["--model", f"{MODELS}:make_tied", "--weights", str(trained["tied"]), "--data", str(root / "digits.npz")]
    assert main(["analyze", *spec]) == 0
    assert "tied: first, last share one weight" in capsys.readouterr().out
    out = tmp_path / "t"
    assert main(["compress", *spec, "--max-macs", "0.7", "--out", str(out), "--quiet", *NOT_ABOUT_LATENCY]) == 0
    table = capsys.readouterr().out
    assert "kept dense: shares its weights with last (tied weights)" in table
    layers = {layer["name"]: layer for layer in json.loads((out / "summary.json").read_text())["layers"]}
    assert layers["first"]["method"] == layers["last"]["method"] == "dense"
    assert "tied" in layers["first"]["reason"] and layers["middle"]["macs"] <= 2 * 64 * 64
    assert main(["compress", *spec, "--max-macs", "0.3", "--out", str(tmp_path / "no"), "--quiet",
                 *NOT_ABOUT_LATENCY]) == 1
    err = capsys.readouterr().err
    assert "cannot be factorized: tied weights 8,192 (first, last)" in err and "below the minimum reachable" in err


def test_no_factorization_bigger_than_its_layer_is_a_candidate_and_apply_warns(tmp_path, capsys):
    torch.manual_seed(0)
    model = KeywordSpotter().eval()
    splits = splits_from((torch.rand(40, 1, 8, 8), torch.arange(40) % 10), (torch.rand(20, 1, 8, 8),
                                                                            torch.arange(20) % 10))
    from rankshrink.search.config import SearchConfig
    from rankshrink.search.session import Session
    from rankshrink.search.space import CostModel, build_spaces

    session = Session(model, splits, SearchConfig(cache=False, progress=False, fit="weights"))
    cost = CostModel(model, session.example_input)
    for space in build_spaces(session, cost, kind="macs"):
        for cand in space.candidates:
            assert cand.params <= space.dense.params and cand.macs <= space.dense.macs, (space.name, cand)
    conv1 = next(s for s in build_spaces(session, cost, kind="params") if s.name == "conv1")
    assert all(c.params < conv1.dense.params for c in conv1.candidates)
    with pytest.warns(rs.methods.FactorizationWarning, match=r"conv1.*tucker2:8x1 costs more than the dense "
                                                             r"Conv1d \(185 parameters vs 96"):
        rs.apply(model, {"conv1": ("tucker2", [8, 1])}, example_input=torch.rand(1, 1, 8, 8))
    plan = tmp_path / "big.json"
    plan.write_text(json.dumps({"layers": {"conv1": {"method": "tucker2", "rank": [8, 1]}}}))
    weights = tmp_path / "kws.safetensors"
    save_tensors(weights, model.state_dict())
    assert main(["apply", "--model", f"{MODELS}:make_keyword_spotter", "--weights", str(weights), "--plan",
                 str(plan), "--input-shape", "1,8,8", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "rankshrink apply: warning: layer 'conv1': tucker2:8x1 costs more than the dense Conv1d" in err
    assert "MACs vs" in err


# --------------------------------------------------------------------------- sanity checks, options

def test_a_model_at_chance_on_the_data_stops_before_searching(digits):
    torch.manual_seed(0)
    untrained = TiedMLP().eval()
    with pytest.raises(DataError, match=r"the original model scores [0-9.]+% accuracy on this data's validation "
                                        r"split, (at or below chance|below the least accepted).*is it the data it "
                                        r"was trained on"):
        rs.compress(untrained, digits, tolerance=0.01, progress=False, cache=False)
    with pytest.raises(DataError, match="below the least accepted 99.0%"):
        rs.compress(untrained, digits, tolerance=0.01, progress=False, cache=False, min_baseline=0.99)
    result = rs.compress(untrained, digits, budget={"params": 0.9}, progress=False, cache=False, min_baseline=0.0,
                         fit="weights")
    assert result.ratio("params") <= 0.9


def test_a_permuted_label_order_is_caught(files, digits):
    root, trained = files
    model = _load("make_tied", trained["tied"])
    x, y = digits.val.tensors
    wrong = splits_from((digits.train.tensors[0], (digits.train.tensors[1] + 3) % 10), (x, (y + 3) % 10))
    with pytest.raises(DataError, match="is it the data it was trained on"):
        rs.compress(model, wrong, tolerance=0.01, progress=False, cache=False)


def test_inputs_the_model_cannot_take_name_the_input_and_the_layer(files):
    root, trained = files
    model = _load("make_image_and_side", trained["image_and_side"])
    splits = load_data(str(root / "named.npz"))
    x, side = first_batch(splits.val, 4)[0].values()
    bad = splits_from({"image": x, "sidebar": side}, {"image": x, "sidebar": side})
    with pytest.raises(DataError, match=r"input\(s\) 'sidebar' that ImageAndSide.forward\(image, side\) does not take"):
        rs.compress(model, bad, tolerance=0.01, progress=False, cache=False)
    narrow = splits_from({"image": x, "side": side[:, :3]}, {"image": x, "side": side[:, :3]})
    with pytest.raises(DataError, match=r"layer 'side' \(Linear, expects inputs of shape \(\.\.\., 4\)\) got \(4, 3\)"):
        rs.compress(model, narrow, tolerance=0.01, progress=False, cache=False)


def test_layer_patterns_choose_what_is_compressed(files, capsys, tmp_path):
    root, trained = files
    model = _load("make_resnetish", trained["resnetish"])
    splits = load_data(str(root / "digits.npz"))
    result = rs.compress(model, splits, budget={"macs": 0.8}, exclude=["conv*"], progress=False, cache=False,
                         fit="weights", methods=["svd", "weight"])
    assert not any(name.startswith("conv") for name in result.plan)
    reasons = {layer["name"]: layer["reason"] for layer in result.layers}
    assert reasons["conv1"] == reasons["conv2"] == "left out by --layers/--exclude"
    only = rs.compress(model, splits, budget={"macs": 0.9}, layers=["conv?"], progress=False, cache=False,
                       fit="weights", methods=["svd", "weight"])
    assert set(only.plan) <= {"conv1", "conv2"}
    with pytest.raises(rs.PlanError, match="--layers pattern 'cnv\\*' matches no factorizable layer"):
        rs.compress(model, splits, budget={"macs": 0.9}, layers=["cnv*"], progress=False, cache=False)
    spec = ["--model", f"{MODELS}:make_resnetish", "--weights", str(trained["resnetish"]), "--data",
            str(root / "digits.npz")]
    capsys.readouterr()
    assert main(["analyze", *spec, "--layers", "conv1,head"]) == 0
    table = capsys.readouterr().out.split("\n\n")[0]
    assert "conv1" in table and "head" in table and "conv2" not in table
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": {"conv1": {"method": "weight", "rank": 4},
                                           "head": {"method": "svd", "rank": 4}}}))
    assert main(["apply", *spec, "--plan", str(plan), "--exclude", "head", "--out", str(tmp_path / "o")]) == 0
    assert list(rs.Plan.load(tmp_path / "o" / "plan.json")) == ["conv1"]


def test_unlabelled_data_compresses_by_agreement_and_finetunes_by_distillation(files, tmp_path, capsys):
    root, trained = files
    spec = ["--model", f"{MODELS}:make_tied", "--weights", str(trained["tied"]),
            "--data", str(root / "unlabelled.npz")]
    out = tmp_path / "u"
    assert main(["compress", *spec, "--max-macs", "0.8", "--out", str(out), "--quiet", *NOT_ABOUT_LATENCY]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "agreement" and summary["original"]["metric"] == 1.0
    assert summary["original"]["accuracy"] is None
    tuned = tmp_path / "f"
    assert main(["finetune", "--model", f"{MODELS}:make_tied", "--weights", str(out), "--data",
                 str(root / "unlabelled.npz"), "--epochs", "1", "--out", str(tuned), "--no-progress"]) == 1
    assert "no labels" in capsys.readouterr().err
    assert main(["finetune", "--model", f"{MODELS}:make_tied", "--weights", str(out), "--data",
                 str(root / "unlabelled.npz"), "--epochs", "1", "--distill", "--distill-loss", "mse",
                 "--teacher-weights", str(trained["tied"]), "--out", str(tuned), "--no-progress"]) == 0
    result = json.loads((tuned / "summary.json").read_text())["finetune"]
    assert result["val_after"] >= result["val_before"]  # agreement with the teacher never gets worse


def test_the_cache_key_changes_with_the_validation_data(tmp_path, files):
    root, trained = files
    model = _load("make_tied", trained["tied"])
    digits = load_data(str(root / "digits.npz"))
    x, y = digits.val.tensors
    cache = tmp_path / "shared-cache"
    first = rs.compress(model, digits, budget={"macs": 0.8}, progress=False, cache=cache, fit="weights")
    same = rs.compress(model, digits, budget={"macs": 0.8}, progress=False, cache=cache, fit="weights")
    assert same.evaluations == 0 and same.evaluations_cached == first.requested
    changed = x.clone()
    changed[0] = 1.0 - changed[0]  # one validation sample
    other = splits_from(digits.train, (changed, y), digits.test)
    again = rs.compress(model, other, budget={"macs": 0.8}, progress=False, cache=cache, fit="weights")
    assert again.evaluations_cached == 0 and again.evaluations >= 1


def test_builtin_mnist_mlp_takes_784_inputs_with_mnist_shaped_data(tmp_path, capsys):
    from rankshrink.models import MnistMLP, load_model_spec

    weights = tmp_path / "mlp784.safetensors"
    torch.manual_seed(0)
    save_tensors(weights, MnistMLP(num_features=784).state_dict())
    mnist_like = load_data("synthetic:mnist")
    model = load_model_spec("builtin:mnist-mlp", weights, data=mnist_like)
    assert model.layers[0].in_features == 784
    assert main(["analyze", "--model", "builtin:mnist-mlp", "--weights", str(weights), "--data",
                 "synthetic:mnist"]) == 0
    assert "128×784" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["analyze", "--model", "builtin:mnist-mlp", "--weights", str(weights)]) == 1
    assert "built for the data's inputs (1, 8, 8)" in capsys.readouterr().err


def test_untraceable_models_fold_only_what_keeps_their_outputs():
    class Branchy(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
            self.head = nn.Linear(4 * 64, 10)

        def forward(self, x):
            if float(x.sum()) > 0:
                x = self.body(x)
            else:
                x = self.body(-x)
            return self.head(x.flatten(1))

    class Skipping(Branchy):  # uses the conv's output without its BatchNorm: folding would change it
        def forward(self, x):
            h = self.body[0](x)
            if float(x.sum()) > 0:
                h = h + 0 * self.body[1](h)
            return self.head(h.flatten(1))

    x = torch.rand(3, 1, 8, 8)
    for cls, keeps in ((Branchy, True), (Skipping, False)):
        torch.manual_seed(0)
        model = _randomise_batchnorm(cls())
        assert rs.layers.batchnorm_folds(model) == [("body.0", "body.1")]  # the nn.Sequential pattern
        folded = rs.surgery.fold_batchnorm(model)
        assert rs.surgery.folding_preserves_outputs(model, folded, x) is keeps
