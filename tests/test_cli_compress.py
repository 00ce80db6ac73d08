"""End-to-end tests of `rankshrink compress` and `rankshrink demo` (through main(), in-process)."""

import json

import pytest
import torch

import rankshrink
from rankshrink.cli import main
from rankshrink.cli.compress import parse_amount, parse_byte_budget, parse_confidence, parse_tolerance
from rankshrink.errors import ConfigError
from rankshrink.files import save_tensors, verify_output_set
from rankshrink.metrics import accuracy
from rankshrink.models import DigitsCNN
from rankshrink.plan import Plan
from rankshrink.search.evaluate import single_threaded

pytestmark = pytest.mark.slow
# Tests about something other than latency or ONNX (the search, fine-tuning, plans): MACs decide, no model.onnx.
# (A MAC budget near what the digits CNN allows depends on which candidates measure faster on a loaded machine.)
NOT_ABOUT_LATENCY = ("--ignore-latency", "--no-export")


@pytest.fixture(scope="module")
def digits(request, tmp_path_factory):
    from rankshrink.models import load_builtin

    try:
        where = request.config.cache.mkdir("rankshrink-digits-cnn")
    except AttributeError:
        where = tmp_path_factory.mktemp("models")
    with single_threaded():
        model, splits = load_builtin("digits-cnn", cache_dir=where, progress=False)
    path = tmp_path_factory.mktemp("weights") / "digits.safetensors"
    save_tensors(path, model.state_dict())
    return model, splits, path


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("rankshrink-cache")


@pytest.fixture(autouse=True)
def temp_cache(module_cache, tmp_path, monkeypatch):
    # One cache for this module (not shared with other tests): later tests reuse the
    # candidates' proxies the first one computed, which keeps the module fast.
    monkeypatch.setenv("RANKSHRINK_CACHE", str(module_cache))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _args(weights, out, *extra):
    return ["compress", "--model", "builtin:digits-cnn", "--weights", str(weights), "--data", "builtin:digits",
            "--out", str(out), "--quiet", *extra]


def test_parsers():
    assert parse_tolerance("0.01") == 0.01 and parse_tolerance("1%") == pytest.approx(0.01)
    assert parse_amount("0.5", "x") == 0.5 and parse_amount("50%", "x") == 0.5
    assert parse_amount("120000", "x") == 120000 and parse_amount("1.2M", "x") == 1_200_000
    assert parse_amount("350k", "x") == 350_000
    assert parse_byte_budget("256KB") == 256_000 and parse_byte_budget("1.5MB") == 1_500_000
    assert parse_byte_budget("25%") == 0.25
    for bad in ("-0.1", "1", "1.5", "abc"):
        with pytest.raises(ConfigError):
            parse_tolerance(bad)
    for bad in ("0", "-3", "lots", "150%"):
        with pytest.raises(ConfigError):
            parse_amount(bad, "--max-macs")
    assert parse_confidence("0.95") == 0.95 and parse_confidence("90%") == pytest.approx(0.9)
    for bad in ("0", "1", "95", "high"):
        with pytest.raises(ConfigError, match="--confidence"):
            parse_confidence(bad)


def test_compress_tolerance_end_to_end(tmp_path, capsys, digits):
    model, splits, weights = digits
    out = tmp_path / "out"
    assert main(_args(weights, out, "--tolerance", "0.01")) == 0
    text = capsys.readouterr().out
    assert "features.2" in text and "MACs" in text and "test accuracy" in text
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.safetensors", "plan.json", "report.html",
                                                     "summary.json"]
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())  # no staging left
    summary = json.loads((out / "summary.json").read_text())
    assert set(verify_output_set(out)["files"]) == {"model.onnx", "model.safetensors", "plan.json"}  # one set
    for side in ("original", "compressed"):
        for key in ("accuracy", "test_accuracy", "params", "macs", "bytes"):
            assert isinstance(summary[side][key], (int, float)), (side, key)
    assert summary["seed"] == 0 and summary["evaluations"] > 0
    assert summary["original"]["accuracy"] - summary["compressed"]["accuracy"] <= 0.01 + 1e-9
    assert summary["compressed"]["macs"] < summary["original"]["macs"]
    # Paired bootstrap intervals of the drop, shown in the summary; every record has its plan's costs.
    ci = summary["drop_ci"]
    assert ci["validation"][0] <= summary["drop"] <= ci["validation"][1]
    test_drop = summary["original"]["test_accuracy"] - summary["compressed"]["test_accuracy"]
    assert ci["test"][0] <= test_drop <= ci["test"][1]
    assert "95% paired bootstrap interval: validation [" in text
    assert all(isinstance(r[k], int) for r in summary["records"] for k in ("params", "bytes", "macs"))
    final = [r for r in summary["records"] if r["plan"] == Plan.load(out / "plan.json").to_dict()["layers"]]
    assert final and final[0]["macs"] == summary["compressed"]["macs"]
    for layer in summary["layers"]:
        assert {"name", "method", "rank", "params", "macs"} <= set(layer)
    plan = Plan.load(out / "plan.json")
    assert set(plan.layers) == {row["name"] for row in summary["layers"] if row["method"] != "dense"}
    rebuilt = rankshrink.load(DigitsCNN, out)
    assert accuracy(rebuilt, splits.val) == pytest.approx(summary["compressed"]["accuracy"])
    assert accuracy(rebuilt, splits.test) == pytest.approx(summary["compressed"]["test_accuracy"])
    # The shipped ONNX file is the compressed model, on ONNX Runtime, and no slower than the original.
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = rebuilt(splits.test.tensors[0][:50]).numpy()
    got = session.run(None, {"input": splits.test.tensors[0][:50].numpy()})[0]
    assert abs(got - expected).max() <= 1e-4 * max(1.0, abs(expected).max())
    assert set(summary["latency_ms"]) == {"original", "compressed"}
    for side in summary["latency_ms"].values():
        assert set(side) == {"1", "32"}
        assert all(0 < v["fastest"] <= v["median"] <= v["p90"] and v["runs"] >= 30 and v["threads"] == 1
                   for v in side.values())
    assert summary["deployment"][1]["file_bytes"] == (out / "model.onnx").stat().st_size
    assert all(r < 1 for r in (p["measured_ratio"] for p in summary["latency_search"]["prediction"].values()))
    # The same search through the API (all from the cache now) builds the same model.
    from rankshrink.search import compress

    again = compress(model, splits, tolerance=0.01, progress=False, latency=True)
    assert again.evaluations == 0 and again.plan.key() == plan.key()
    x = splits.val.tensors[0]
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), again.compressed_model().eval()(x), atol=1e-5)
    # A rerun of the command costs no evaluations.
    assert main(_args(weights, out, "--tolerance", "0.01", "--force")) == 0
    rerun = json.loads((out / "summary.json").read_text())
    assert rerun["evaluations"] == 0
    assert rerun["evaluations_cached"] == summary["evaluations"] + summary["evaluations_cached"]


def test_compress_with_confidence_keeps_the_interval_under_the_tolerance(tmp_path, capsys, digits):
    model, splits, weights = digits
    out = tmp_path / "out"
    assert main(_args(weights, out, "--tolerance", "0.02", "--confidence", "0.9", *NOT_ABOUT_LATENCY)) == 0
    text = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["confidence"] == 0.9
    assert summary["drop_ci"]["validation"][1] <= 0.02 + 1e-9
    assert "90% paired bootstrap interval" in text and "the tolerance applies to the upper end" in text
    # Every record the search judged carries the interval's upper end it was judged by.
    assert all(r["drop_high"] is not None for r in summary["records"] if r["plan"])


@pytest.mark.parametrize("flag,value,kind,target,extra", [
    ("--max-macs", "50%", "macs", None, ()),
    # Latency-aware ranks move in multiples of 8, too coarse to fill 98% of a small budget: measured by formula here.
    ("--max-params", "20k", "params", 20_000, ("--ignore-latency",)),
    ("--max-bytes", "120KB", "bytes", 120_000, ("--seed", "3", "--methods", "svd,weight"))])
def test_compress_budget(tmp_path, digits, flag, value, kind, target, extra):
    model, splits, weights = digits
    out = tmp_path / "out"
    assert main(_args(weights, out, flag, value, *extra)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == (3 if "--seed" in extra else 0)
    if "--methods" in extra:
        assert {row["method"] for row in summary["layers"]} <= {"svd", "weight", "dense"}
    target = target or int(0.5 * summary["original"][kind])
    if kind == "bytes":  # the shipped file counts: model.onnx
        assert summary["budget"]["file_target"] == target
        assert (out / "model.onnx").stat().st_size == summary["budget"]["file_bytes"] <= target
        assert summary["budget"]["file_bytes"] >= 0.9 * target
        return
    assert summary["budget"]["target"] == target
    assert 0.98 * target <= summary["compressed"][kind] <= target
    rebuilt = rankshrink.load(DigitsCNN, out)
    counted = rankshrink.count(rebuilt, splits.val.tensors[0][:1])
    assert {"macs": counted.macs, "params": counted.params, "bytes": counted.bytes}[kind] == summary["compressed"][kind]


def _fails(capsys, argv, *needles):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, capsys, digits):
    model, splits, weights = digits
    out = tmp_path / "out"
    _fails(capsys, _args(weights, out, "--tolerance", "1.5"), "tolerance")
    _fails(capsys, _args(weights, out, "--tolerance", "-0.01"), "tolerance")
    _fails(capsys, _args(weights, out, "--max-macs", "0"), "--max-macs")
    _fails(capsys, _args(weights, out, "--max-bytes", "12XB"), "--max-bytes")
    _fails(capsys, _args(weights, out, "--max-macs", "100"), "minimum reachable")
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    # A model whose outputs do not fit the labels.
    model_file = tmp_path / "tiny.py"
    model_file.write_text("import torch\n\ndef make():\n    return torch.nn.Sequential(torch.nn.Flatten(), "
                          "torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))\n")
    _fails(capsys, ["compress", "--model", f"{model_file}:make", "--data", "builtin:digits", "--tolerance", "0.01",
                    "--out", str(out), "--quiet"], "classes")
    assert not out.exists()
    # A non-empty --out without --force.
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(capsys, _args(weights, out, "--tolerance", "0.01"), "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_demo_json(tmp_path, capsys, digits, monkeypatch):
    model, splits, weights = digits
    # Reuse the module's trained weights as the demo's cached model.
    from rankshrink.models import builtin_weights_path

    target = builtin_weights_path("digits-cnn", splits.fingerprint)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(weights.read_bytes())
    out = tmp_path / "demo.json"
    assert main(["demo", "--json", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "demo:" in text and "MACs" in text
    summary = json.loads(out.read_text())
    assert summary["tolerance"] == 0.01
    assert summary["original"]["accuracy"] - summary["compressed"]["accuracy"] <= 0.01 + 1e-9
    assert summary["compressed"]["macs"] < 0.5 * summary["original"]["macs"]


def test_compress_with_finetune_records_recovery(tmp_path):
    """`compress --finetune N --distill`: the search's plan, then fine-tuned factors, never worse on validation."""
    import json

    from rankshrink.cli import main

    out = tmp_path / "out"
    code = main(["compress", "--model", "builtin:digits-cnn", "--max-macs", "0.15", "--methods", "svd,weight",
                 "--finetune", "2", "--distill", "--out", str(out), "--quiet", "--no-cache", *NOT_ABOUT_LATENCY])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    tuned = summary["finetune"]
    assert tuned["distilled"] is True and tuned["epochs_run"] == 2
    assert tuned["val_after"] >= tuned["val_before"]
    assert summary["compressed"]["accuracy"] == tuned["val_after"]
    assert summary["compressed"]["macs_ratio"] <= 0.15


def test_a_plan_reproduces_the_model_compress_saved(tmp_path, capsys, digits):
    """compress → plan.json → apply (and finetune --epochs 0) with the same data: the same tensors.

    The plan records that its factors were fitted to activations and how the calibration was
    drawn; without data, apply refuses instead of silently fitting to the weights.
    """
    from rankshrink.files import load_tensors

    _, _, weights = digits
    factory = tmp_path / "my_model.py"
    factory.write_text("from rankshrink.models import DigitsCNN\n\ndef make():\n    return DigitsCNN()\n")
    spec = f"{factory}:make"
    common = ["--model", spec, "--weights", str(weights)]
    out = tmp_path / "c"
    assert main(["compress", *common, "--data", "builtin:digits", "--max-macs", "0.3", "--out", str(out),
                 "--quiet", *NOT_ABOUT_LATENCY]) == 0
    plan = Plan.load(out / "plan.json")
    assert plan.activation_layers and plan.calibration["samples"] == 512
    saved = load_tensors(out / "model.safetensors")
    for command, extra in (("apply", []), ("finetune", ["--epochs", "0", "--no-progress"])):
        again = tmp_path / command
        assert main([command, *common, "--plan", str(out / "plan.json"), "--data", "builtin:digits",
                     "--out", str(again), *extra]) == 0, command
        rebuilt = load_tensors(again / "model.safetensors")
        assert rebuilt.keys() == saved.keys()
        assert max(float((rebuilt[k].double() - saved[k].double()).abs().max()) for k in saved) <= 1e-6, command
    capsys.readouterr()
    assert main(["apply", *common, "--plan", str(out / "plan.json"), "--out", str(tmp_path / "nodata")]) == 1
    err = capsys.readouterr().err
    assert "--data" in err and "--fit weights" in err and not (tmp_path / "nodata").exists()
    # re-fitted to the weights it needs no data, and gives other factors
    assert main(["apply", *common, "--plan", str(out / "plan.json"), "--fit", "weights",
                 "--out", str(tmp_path / "weights")]) == 0
    refit = load_tensors(tmp_path / "weights" / "model.safetensors")
    assert any(not torch.equal(refit[k], saved[k]) for k in saved)
