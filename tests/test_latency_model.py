"""The latency model: measured layer times against dense, the cache, interpolation, rank advice,
and whole-model prediction checked against a measurement."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime", reason="latency tests need onnxruntime (pip install 'rankshrink[onnx]')")
pytest.importorskip("onnx", reason="latency tests need onnx (pip install 'rankshrink[onnx]')")

from rankshrink import Plan, apply  # noqa: E402
from rankshrink.deploy.latency_model import (  # noqa: E402
    LatencyCache,
    LatencyModel,
    LatencySettings,
    cpu_model,
    factor_block,
    layer_input,
    rounded_ranks,
    runtime_identity,
)
from rankshrink.deploy.onnx import onnx_bytes, ort_session, require_onnxruntime  # noqa: E402
from rankshrink.errors import ConfigError, LayerError  # noqa: E402
from rankshrink.factorized import layer_geometry  # noqa: E402
from rankshrink.methods import get_method, methods_for  # noqa: E402

FAST = LatencySettings(runs=5, warmup=1, min_ms=0.0, max_runs=5)
CONV = layer_geometry(nn.Conv2d(16, 32, 3, padding=1))
LINEAR = layer_geometry(nn.Linear(256, 128))


def test_identity_names_runtime_version_cpu_and_threads() -> None:
    ort = require_onnxruntime()
    identity = runtime_identity(3)
    assert identity == {"runtime": "onnxruntime", "version": ort.__version__, "provider": "CPUExecutionProvider",
                        "cpu": cpu_model(), "threads": 3}
    assert cpu_model().strip()


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="batches"):
        LatencySettings(batches=())
    with pytest.raises(ConfigError, match="threads"):
        LatencySettings(threads=0)
    with pytest.raises(ConfigError, match="max_runs"):
        LatencySettings(runs=10, max_runs=5)


@pytest.mark.parametrize("geometry", [CONV, LINEAR], ids=["conv", "linear"])
def test_blocks_come_from_the_registry_and_run_on_onnx_runtime(geometry) -> None:
    ort = require_onnxruntime()
    for method in methods_for(geometry):
        impl = get_method(method)
        rank = impl.normalize_rank(geometry, 4 if geometry["type"] == "Linear" else 3)
        block = factor_block(geometry, method, rank)
        expected = impl.build(geometry, rank)
        assert block.method == method and block.rank == rank
        assert [type(m) for m in block] == [type(m) for m in expected]
        assert [p.shape for p in block.parameters()] == [p.shape for p in expected.parameters()]
        assert all(torch.isfinite(p).all() for p in block.parameters())
        x = layer_input(geometry, (8, 8) if geometry["type"] == "Conv2d" else (1,), 2)
        got = ort_session(ort, onnx_bytes(block, x), 1).run(None, {"input": x.numpy()})[0]
        np.testing.assert_allclose(got, block(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_rounded_ranks_are_multiples_within_the_range() -> None:
    assert rounded_ranks("svd", LINEAR, 13, 8) == [8, 16]
    assert rounded_ranks("svd", LINEAR, 16, 8) == []          # already a multiple
    assert rounded_ranks("svd", LINEAR, 3, 8) == [8]            # never below one multiple
    assert rounded_ranks("svd", LINEAR, 125, 8) == [120, 128]
    assert rounded_ranks("svd", layer_geometry(nn.Linear(20, 20)), 18, 8) == [16]  # 24 > full rank 20
    assert rounded_ranks("tucker2", CONV, (5, 13), 4) == [(4, 12), (8, 16)]
    with pytest.raises(ConfigError):
        rounded_ranks("svd", LINEAR, 13, 1)


def test_measurements_are_cached_per_key_and_reused(tmp_path) -> None:
    first = LatencyModel(FAST, cache_dir=tmp_path)
    timings = first.measure(CONV, (8, 8), "tucker2", [4, 8], batches=(1, 4))
    assert first.measurements == 1 and first.cache.writes == 4  # 2 ranks × 2 batches, one file each
    for rank in ((4, 4), (8, 8)):
        for batch in (1, 4):
            t = timings[rank][batch]
            assert t.measured and t.dense_ms > 0 and t.factorized_ms > 0 and t.runs == 5
            assert t.ratio == pytest.approx(t.factorized_ms / t.dense_ms)
    again = LatencyModel(FAST, cache_dir=tmp_path)
    assert again.measure(CONV, (8, 8), "tucker2", [4, 8], batches=(1, 4)) == timings
    assert again.measurements == 0 and again.cache.hits == 4
    # Another thread count, batch or runtime version is another key.
    other = LatencyModel(LatencySettings(threads=2, runs=5, warmup=1, min_ms=0.0, max_runs=5), cache_dir=tmp_path)
    other.measure(CONV, (8, 8), "tucker2", [4], batches=(1,))
    assert other.measurements == 1
    again.identity = {**again.identity, "version": "0.0.0"}
    again.measure(CONV, (8, 8), "tucker2", [4], batches=(1,))
    assert again.measurements == 1


def test_a_corrupt_or_foreign_cache_entry_is_measured_again(tmp_path) -> None:
    model = LatencyModel(FAST, cache_dir=tmp_path)
    model.measure(LINEAR, (1,), "svd", [8], batches=(1,))
    [path] = list(tmp_path.rglob("*.json"))
    entry = json.loads(path.read_text())
    assert entry["payload"]["cpu"] == cpu_model() and entry["payload"]["threads"] == 1
    entry["body"]["factorized_ms"] = 1e-9  # a changed value no longer matches its checksum
    path.write_text(json.dumps(entry))
    fresh = LatencyModel(FAST, cache_dir=tmp_path)
    fresh.measure(LINEAR, (1,), "svd", [8], batches=(1,))
    assert fresh.measurements == 1 and fresh.cache.hits == 0
    path.write_text("not json")
    assert LatencyCache(tmp_path).get(fresh._payload(LINEAR, (1,), "svd", 8, 1)) is None


def test_interpolation_is_linear_in_macs_between_measured_ranks() -> None:
    model = LatencyModel(FAST, cache_dir=None)
    ranks = [2, 5, 9, 17, 33]
    estimated = model.estimate(LINEAR, (1,), "svd", ranks, batches=(1,), anchors=2)
    assert [estimated[r][1].measured for r in ranks] == [True, False, False, False, True]
    impl = get_method("svd")
    macs = {r: impl.cost(LINEAR, r, (1,)).macs for r in ranks}
    low, high = estimated[2][1].ratio, estimated[33][1].ratio
    for rank in (5, 9, 17):
        share = (macs[rank] - macs[2]) / (macs[33] - macs[2])
        assert estimated[rank][1].ratio == pytest.approx(low + share * (high - low))
        assert estimated[rank][1].runs == 0


def test_advice_flags_ranks_slower_than_dense_and_rounds_to_measured_faster_multiples() -> None:
    settings = LatencySettings(runs=15, warmup=3, min_ms=15.0, max_runs=200, batches=(1, 32))
    model = LatencyModel(settings, cache_dir=None)
    geometry = layer_geometry(nn.Linear(512, 512))
    # Rank 512 does twice the dense layer's MACs in two kernels; rank 8 does 1/32 of them.
    advice = model.advise(geometry, (1,), "svd", [8, 13, 512], multiple=8)
    assert 512 in advice.slower and 8 not in advice.slower and advice.faster()[0] == 8
    assert all(t.measured for per in advice.timings.values() for t in per.values())
    for rank, rounded in advice.rounded.items():
        assert rounded % 8 == 0 and rounded in rounded_ranks("svd", geometry, rank, 8)
    # Every verdict is what the stored timings say.
    for rank, per in advice.timings.items():
        assert (rank in advice.slower) == any(t.factorized_ms > t.dense_ms for t in per.values())
    assert json.loads(json.dumps(advice.to_dict()))["slower"] == [r for r in advice.slower]
    with pytest.raises(LayerError):
        model.advise(CONV, (8, 8), "svd", [4])


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).eval()


def test_whole_model_prediction_and_its_check() -> None:
    settings = LatencySettings(runs=20, warmup=3, min_ms=20.0, max_runs=300, batches=(1, 32))
    model = LatencyModel(settings, cache_dir=None)
    original = _mlp()
    x = torch.randn(1, 512)
    baseline = model.baseline(original, x)
    assert sorted(baseline.layers) == ["0", "2", "4"]
    for batch in (1, 32):
        # Nothing factorized: the prediction is the measured model itself (the rest plus the layers).
        assert model.predict(baseline, Plan())[batch] == pytest.approx(baseline.model_ms[batch].median_ms)
        assert baseline.rest_ms(batch) == pytest.approx(
            baseline.model_ms[batch].median_ms - sum(layer.dense_ms[batch] for layer in baseline.layers.values()))
    plan = Plan.from_mapping({"0": ("svd", 16), "2": ("svd", 16)})
    compressed = apply(original, plan)
    checks = model.check(baseline, original, compressed, plan, x)
    assert [c.batch for c in checks] == [1, 32]
    for check in checks:
        # Two of the three layers at 1/16 of their MACs: both predicted and measured clearly faster.
        assert check.predicted_ratio < 0.8 and check.measured_ratio < 0.8
        assert abs(check.predicted_ms - check.measured_ms) < 0.5 * check.original_ms
        assert check.error == pytest.approx(check.predicted_ratio / check.measured_ratio - 1)
        assert math.isfinite(check.to_dict()["error"])
    with pytest.raises(LayerError, match="baseline"):
        model.predict(model.baseline(original, x, layers=["4"], batches=(1,)), plan)


def test_in_context_measurements_time_the_whole_model_with_one_layer_factorized(tmp_path) -> None:
    settings = LatencySettings(runs=10, warmup=2, min_ms=10.0, max_runs=200, batches=(1, 32))
    model = LatencyModel(settings, cache_dir=tmp_path)
    original = _mlp()
    x = torch.randn(1, 512)
    timings = model.measure_in_model(original, x, "0", "svd", [8], batches=(1, 32))
    for t in timings[8].values():
        assert t.measured and t.ratio < 1.0  # one 512×512 layer of three at 1/32 of its MACs
    assert model.measurements == 1
    assert model.measure_in_model(original, x, "0", "svd", [8], batches=(1, 32)) == timings
    assert model.measurements == 1 and model.cache.hits == 2
    baseline = model.baseline(original, x)
    assert model.predict(baseline, Plan(), context="model") == {
        b: pytest.approx(baseline.model_ms[b].median_ms) for b in (1, 32)}
    plan = Plan.from_mapping({"0": ("svd", 8), "2": ("svd", 8)})
    for check in model.check(baseline, original, apply(original, plan), plan, x, context="model"):
        assert check.predicted_ratio < 0.8 and check.measured_ratio < 0.8
    with pytest.raises(ConfigError, match="context"):
        model.predict(baseline, plan, context="device")


def _op_types(graph: bytes) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load_from_string(graph).graph.node}


def test_int8_settings_time_quantized_graphs_under_their_own_key(tmp_path) -> None:
    from rankshrink.deploy.quantize import timing_graph

    with pytest.raises(ConfigError, match="int8"):
        LatencySettings(int8="int4")
    float32 = LatencyModel(FAST, cache_dir=tmp_path)
    quantized = LatencyModel(LatencySettings(runs=5, warmup=1, min_ms=0.0, max_runs=5, int8="static"),
                             cache_dir=tmp_path)
    assert "int8" not in float32.identity and quantized.identity == {**float32.identity, "int8": "static"}
    float32.measure(LINEAR, (1,), "svd", [8], batches=(1,))
    quantized.measure(LINEAR, (1,), "svd", [8], batches=(1,))
    assert quantized.measurements == 1 and quantized.cache.hits == 0  # not the float32 entry
    assert len(list(tmp_path.rglob("*.json"))) == 2
    # What is timed: the block quantized as a shipped file is (QDQ static, integer matmuls dynamic), and it still
    # computes the layer (static ranges calibrated on the example batch).
    block = factor_block(LINEAR, "svd", 8)
    x = layer_input(LINEAR, (1,), 16)
    assert not {"QuantizeLinear", "DynamicQuantizeLinear"} & _op_types(timing_graph(block, x))
    static = timing_graph(block, x, int8="static")
    assert "QuantizeLinear" in _op_types(static)
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & _op_types(timing_graph(block, x, int8="dynamic"))
    ort = require_onnxruntime()
    got = ort_session(ort, static, 1).run(None, {"input": x.numpy()})[0]
    want = block(x).detach().numpy()
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_int8_timing_graphs_calibrate_models_with_dict_inputs() -> None:
    from rankshrink.deploy.latency import repeat_to_batch
    from rankshrink.deploy.onnx import onnx_feed
    from rankshrink.deploy.quantize import timing_graph

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.left, self.right = nn.Linear(12, 8), nn.Linear(6, 8)

        def forward(self, a, b):  # a dict input is passed as keywords, as to a Hugging Face model
            return self.left(a) + self.right(b)

    model = TwoInputs().eval()
    sample = {"a": torch.randn(1, 12), "b": torch.randn(1, 6)}
    graph = timing_graph(model, sample, int8="static", calibration=repeat_to_batch(sample, 8))
    assert "QuantizeLinear" in _op_types(graph)
    out = ort_session(require_onnxruntime(), graph, 1).run(None, onnx_feed(repeat_to_batch(sample, 3)))[0]
    assert out.shape == (3, 8)
