"""End-to-end tests of the `analyze` and `apply` commands (through main(), in-process)."""

import json

import pytest
import torch

from rankshrink.cli import main
from rankshrink.models import load_builtin
from rankshrink.plan import Plan
from rankshrink.surgery import load


@pytest.fixture(scope="module")
def digits_weights(tmp_path_factory):
    model, _ = load_builtin("digits-cnn", progress=False)
    path = tmp_path_factory.mktemp("weights") / "digits.pt"
    torch.save(model.state_dict(), path)
    return path, model


def test_analyze_prints_every_layer_and_writes_json(tmp_path, capsys, digits_weights):
    weights, _ = digits_weights
    out = tmp_path / "analysis.json"
    assert main(["analyze", "--model", "builtin:digits-cnn", "--weights", str(weights), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("features.0", "features.2", "classifier.1", "classifier.3"):
        assert name in text
    data = json.loads(out.read_text())
    fc = next(layer for layer in data["layers"] if layer["name"] == "classifier.1")
    assert fc["weight_shape"] == [128, 512]
    assert fc["break_even"]["svd"]["params"] == (128 * 512 - 1) // (128 + 512)  # 102
    assert fc["macs"] == 128 * 512
    assert len(fc["singular_values"]) == 128
    assert fc["rank_for_energy"]["90%"] <= fc["rank_for_energy"]["99%"] <= 128


def test_apply_writes_a_model_that_loads_back(tmp_path, digits_weights):
    weights, model = digits_weights
    plan_path = tmp_path / "plan.json"
    Plan.from_mapping({"classifier.1": ("svd", 16), "features.2": ("tucker2", [8, 8])}).save(plan_path)
    out = tmp_path / "out"
    before = weights.read_bytes()
    assert main(["apply", "--model", "builtin:digits-cnn", "--weights", str(weights), "--plan", str(plan_path),
                 "--out", str(out)]) == 0
    assert weights.read_bytes() == before  # the input file is never written
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compressed"]["params"] < summary["original"]["params"]
    from rankshrink.models import DigitsCNN
    rebuilt = load(DigitsCNN, out)
    x = torch.rand(5, 1, 8, 8)
    from rankshrink.surgery import apply
    expected = apply(model, Plan.load(plan_path))(x)
    torch.testing.assert_close(rebuilt(x), expected, rtol=1e-5, atol=1e-6)


def test_apply_refuses_non_empty_out_without_force(tmp_path, capsys, digits_weights):
    weights, _ = digits_weights
    plan_path = tmp_path / "plan.json"
    Plan.from_mapping({"classifier.1": ("svd", 4)}).save(plan_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert main(["apply", "--model", "builtin:digits-cnn", "--weights", str(weights), "--plan", str(plan_path),
                 "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["apply", "--model", "builtin:digits-cnn", "--weights", str(weights), "--plan", str(plan_path),
                 "--out", str(out), "--force"]) == 0
    assert (out / "mine.txt").read_text() == "keep me"
    assert (out / "model.safetensors").is_file()


def test_bad_plan_entry_is_one_line_error(tmp_path, capsys, digits_weights):
    weights, _ = digits_weights
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps({"layers": {"classifier.9": {"method": "svd", "rank": 4}}}))
    code = main(["apply", "--model", "builtin:digits-cnn", "--weights", str(weights), "--plan", str(plan_path),
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1
    assert "classifier.9" in err and "Did you mean" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
