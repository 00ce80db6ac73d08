"""ONNX export, ONNX Runtime latency and the no-slower-layer rule."""

import numpy as np
import pytest
import torch
from torch import nn

from rankshrink import Plan, apply
from rankshrink.cli import main
from rankshrink.deploy import drop_slower_layers, export_onnx, layer_latencies, onnx_latency

ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime (pip install 'rankshrink[onnx]')")
pytest.importorskip("onnx", reason="ONNX export tests need onnx (pip install 'rankshrink[onnx]')")


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 32),
                         nn.ReLU(), nn.Linear(32, 10)).eval()


def test_exported_graph_matches_pytorch_for_every_method(tmp_path):
    model = _cnn()
    x = torch.randn(4, 3, 8, 8)
    for method in ("spatial", "weight", "tucker2", "cp"):
        compressed = apply(model, Plan.from_mapping({"0": (method, 3), "3": ("svd", 8)}))
        path = export_onnx(compressed, x, tmp_path / f"{method}.onnx")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"input": x.numpy()})[0]
        np.testing.assert_allclose(got, compressed(x).detach().numpy(), rtol=1e-4, atol=1e-5)
        # dynamic batch: a different batch size runs too
        assert session.run(None, {"input": x[:1].numpy()})[0].shape == (1, 10)


def test_latency_and_layer_speeds_are_measured():
    model = _cnn()
    x = torch.randn(1, 3, 8, 8)
    compressed = apply(model, Plan.from_mapping({"3": ("svd", 4)}))
    latency = onnx_latency({"a": model, "b": compressed}, x, runs=5, warmup=1)
    assert set(latency) == {"a", "b"} and all(v.median_ms > 0 and v.runs == 5 for v in latency.values())
    speeds = layer_latencies(model, compressed, x, runs=5)
    assert [s.name for s in speeds] == ["3"] and speeds[0].dense_ms > 0 and speeds[0].factorized_ms > 0


def test_sessions_are_timed_in_bursts_each_burst_starting_with_an_untimed_call():
    from rankshrink.deploy.latency import time_sessions
    from rankshrink.deploy.onnx import onnx_bytes, ort_session

    calls: list[str] = []

    class Recording:  # a real ONNX Runtime session that notes who ran when
        def __init__(self, name, session):
            self.name, self.session = name, session

        def run(self, outputs, feed):
            calls.append(self.name)
            return self.session.run(outputs, feed)

    model, x = _cnn(), torch.randn(1, 3, 8, 8)
    graph = onnx_bytes(model, x)
    sessions = [Recording(name, ort_session(ort, graph, 1)) for name in "ab"]
    feed = {"input": x.numpy()}
    a, b = time_sessions(sessions, [feed, feed], runs=7, warmup=1, burst=4)
    assert a.runs == b.runs == 7 and 0 < a.fastest_ms <= a.median_ms <= a.p90_ms
    # warmup ab, then rounds of 4 calls of one session (1 untimed + 3 timed), the order rotating;
    # the last round times only the 1 sample still missing.
    assert "".join(calls) == "ab" + "aaaa" + "bbbb" + "bbbb" + "aaaa" + "aa" + "bb"
    calls.clear()
    once = time_sessions(sessions, [feed, feed], runs=3, warmup=0, burst=1)
    assert [t.runs for t in once] == [3, 3] and "".join(calls) == "ab" + "ba" + "ab"

def test_rounds_keep_the_median_of_the_runs_medians_and_the_fastest_call_of_all_runs():
    import time as clock

    from rankshrink.deploy.latency import time_rounds

    class Sleeper:  # a graph whose calls take 2 ms in the first run, 6 ms in the second and third (a busy machine)
        calls = 0

        def run(self, outputs, feed):
            Sleeper.calls += 1
            clock.sleep(0.002 if Sleeper.calls <= 6 else 0.006)

    (timing,) = time_rounds([Sleeper()], {1: [{}]}, rounds=3, runs=6, warmup=0, burst=1)
    latency = timing[1]
    # The median run is a busy one; the fastest call is the quiet run's, a 2 ms call.
    assert latency.runs == 18 and latency.median_ms >= 6.0 and latency.p90_ms >= 6.0
    assert 2.0 <= latency.fastest_ms < 6.0


def test_drop_slower_keeps_only_layers_at_or_above_the_threshold():
    model = _cnn()
    x = torch.randn(1, 3, 8, 8)
    plan = Plan.from_mapping({"3": ("svd", 4), "5": ("svd", 9)})
    # An impossible threshold drops everything; a threshold of 0 keeps everything.
    none_left, speeds = drop_slower_layers(model, plan, x, min_speedup=1e9, runs=3)
    assert len(none_left) == 0 and sorted(none_left.metadata["dropped_as_slower"]) == ["3", "5"]
    all_kept, _ = drop_slower_layers(model, plan, x, min_speedup=0.0, runs=3)
    assert list(all_kept) == ["3", "5"]
    assert len(speeds) == 2


def test_export_cli_writes_onnx_and_plan(tmp_path, capsys):
    from rankshrink.models import load_builtin
    from rankshrink.surgery import save
    model, _ = load_builtin("digits-cnn", progress=False)
    weights = tmp_path / "w.safetensors"
    from rankshrink.files import save_tensors
    save_tensors(weights, model.state_dict())
    plan = Plan.from_mapping({"classifier.1": ("svd", 8)})
    save(apply(model, plan), plan, tmp_path / "c")
    code = main(["export", "--model", "builtin:digits-cnn", "--weights", str(weights), "--compressed",
                 str(tmp_path / "c"), "--out", str(tmp_path / "m.onnx"), "--runs", "5",
                 "--drop-slower", str(tmp_path / "kept.json")])
    assert code == 0
    out = capsys.readouterr().out
    assert (tmp_path / "m.onnx").stat().st_size > 0 and "classifier.1" in out
    kept = Plan.load(tmp_path / "kept.json")
    assert set(kept) <= {"classifier.1"}
