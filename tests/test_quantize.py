"""int8 on top of an exported model (dynamic and static QDQ), and the side-by-side measurement of ONNX files."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("onnxruntime", reason="int8 tests need onnxruntime (pip install 'rankshrink[onnx]')")
onnx = pytest.importorskip("onnx", reason="int8 tests need onnx (pip install 'rankshrink[onnx]')")

from rankshrink.deploy import export_onnx  # noqa: E402
from rankshrink.deploy.quantize import QuantizeConfig, measure_onnx_files, quantize_onnx  # noqa: E402
from rankshrink.errors import ConfigError, FileFormatError  # noqa: E402
from rankshrink.files import file_sha256  # noqa: E402
from rankshrink.metrics import accuracy  # noqa: E402
from rankshrink.models import load_builtin  # noqa: E402


def _ops(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.fixture(scope="module")
def digits_cnn():
    return load_builtin("digits-cnn", progress=False)


@pytest.fixture(scope="module")
def digits_mlp():
    return load_builtin("mnist-mlp", progress=False)


def test_dynamic_int8_shrinks_a_linear_model_and_keeps_its_accuracy(tmp_path, digits_mlp) -> None:
    model, splits = digits_mlp
    source = export_onnx(model, splits.val.tensors[0][:4], tmp_path / "model.onnx")
    before = file_sha256(source)
    target = quantize_onnx(source, tmp_path / "model.int8.onnx", mode="dynamic")
    assert file_sha256(source) == before  # the input is only read
    assert {"MatMulInteger", "DynamicQuantizeLinear"} & _ops(target)
    measured = measure_onnx_files({"fp32": source, "int8": target}, splits.test, batches=(1, 8), runs=3,
                                  min_ms=0.0)
    assert measured["int8"].bytes < 0.4 * measured["fp32"].bytes  # float32 weights → int8 (+ scales)
    assert measured["fp32"].bytes == source.stat().st_size
    # ONNX Runtime's float32 graph gives the PyTorch model's accuracy; int8 stays close.
    assert measured["fp32"].metric == pytest.approx(accuracy(model, splits.test), abs=1 / len(splits.test))
    assert measured["int8"].metric > measured["fp32"].metric - 0.05
    assert all(m.latency[b].median_ms > 0 and m.latency[b].runs >= 3 for m in measured.values() for b in (1, 8))
    assert measured["int8"].to_dict()["latency"]["8"]["runs"] >= 3


def test_static_qdq_int8_is_calibrated_on_data(tmp_path, digits_cnn) -> None:
    model, splits = digits_cnn
    source = export_onnx(model, splits.val.tensors[0][:4], tmp_path / "model.onnx")
    target = quantize_onnx(source, tmp_path / "model.int8.onnx", mode="static", calibration=splits.train,
                           config=QuantizeConfig(calibration_samples=128))
    ops = _ops(target)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "Conv" in ops  # QDQ format around float ops
    measured = measure_onnx_files({"fp32": source, "int8": target}, splits.test, batches=(1,), runs=3, min_ms=0.0)
    assert measured["int8"].bytes < 0.5 * measured["fp32"].bytes
    assert measured["int8"].metric > measured["fp32"].metric - 0.05
    # A tensor of inputs calibrates too.
    quantize_onnx(source, tmp_path / "t.int8.onnx", mode="static", calibration=splits.train.tensors[0][:64])


def test_bad_requests_are_refused_in_one_line(tmp_path, digits_mlp) -> None:
    model, splits = digits_mlp
    source = export_onnx(model, splits.val.tensors[0][:2], tmp_path / "model.onnx")
    with pytest.raises(ConfigError, match="calibration"):
        quantize_onnx(source, tmp_path / "x.onnx", mode="static")
    with pytest.raises(ConfigError, match="overwritten"):
        quantize_onnx(source, source)
    with pytest.raises(FileFormatError, match="does not exist"):
        quantize_onnx(tmp_path / "missing.onnx", tmp_path / "x.onnx")
    with pytest.raises(ConfigError, match="int8 mode"):
        QuantizeConfig(mode="int4")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(FileFormatError, match="not a readable ONNX model"):
        quantize_onnx(tmp_path / "junk.onnx", tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(ConfigError, match="data= or example_input="):
        measure_onnx_files({"fp32": source})
    timed = measure_onnx_files({"fp32": source}, example_input=torch.zeros(1, 1, 8, 8), batches=(2,), runs=2,
                               min_ms=0.0)
    assert timed["fp32"].metric is None and timed["fp32"].latency[2].runs == 2
    again = measure_onnx_files({"fp32": source}, example_input=torch.zeros(1, 1, 8, 8), batches=(2,), runs=2,
                               min_ms=0.0, rounds=3)  # three runs: the median of their medians, every run counted
    assert again["fp32"].latency[2].runs == 6 and again["fp32"].latency[2].median_ms > 0
    with pytest.raises(ConfigError, match="rounds"):
        measure_onnx_files({"fp32": source}, example_input=torch.zeros(1, 1, 8, 8), rounds=0)


def _float_weight_convs(path) -> set[str]:
    """Conv nodes whose weight is a float initializer (not fed by a DequantizeLinear)."""
    graph = onnx.load(str(path)).graph
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    return {n.name for n in graph.node if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in floats}


def test_int8_where_faster_profiles_every_conv_and_can_leave_nodes_in_float(tmp_path, digits_cnn) -> None:
    from rankshrink.deploy.quantize import SLOWER_MARGIN, quantize_where_faster

    model, splits = digits_cnn
    example = splits.val.tensors[0][:4]
    source = export_onnx(model, example, tmp_path / "model.onnx")
    convs = [n.name for n in onnx.load(str(source)).graph.node if n.op_type == "Conv"]
    # exclude_nodes keeps a node float32, the others quantized.
    kept = quantize_onnx(source, tmp_path / "one.int8.onnx", mode="static", calibration=splits.train,
                         config=QuantizeConfig(calibration_samples=64, exclude_nodes=(convs[0],)))
    assert _float_weight_convs(kept) == {convs[0]}
    choice = quantize_where_faster(source, tmp_path / "model.int8.onnx", example_input=example,
                                   calibration=splits.train, config=QuantizeConfig(calibration_samples=64),
                                   batches=(1, 4))
    # ONNX Runtime's profile was mapped back to every convolution, in float32 and int8, at both batch sizes.
    assert set(convs) <= set(choice.node_us)
    for name in convs:
        assert all(choice.node_us[name][kind][b] > 0 for kind in ("float32", "int8") for b in (1, 4))
    slower = {n for n, d in choice.node_us.items()
              if sum(d["int8"][b] / d["float32"][b] for b in (1, 4)) / 2 > SLOWER_MARGIN}
    assert set(choice.float_nodes) in (set(), slower)  # the slower ones, if that file measured faster
    assert (choice.ratio is None) == (not slower)
    assert _float_weight_convs(choice.path) == set(choice.float_nodes) & set(convs)
    measured = measure_onnx_files({"fp32": source, "int8": choice.path}, splits.test, batches=(1,), runs=3,
                                  min_ms=0.0)
    assert measured["int8"].metric > measured["fp32"].metric - 0.05
    assert choice.to_dict()["float_nodes"] == choice.float_nodes and not choice.reused
    # The same structure with other weights (the file a search measured, then the one compress ships) gets the
    # same decision without profiling again; other batch sizes are decided anew.
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    again = quantize_where_faster(export_onnx(other, example, tmp_path / "other.onnx"), tmp_path / "other.int8.onnx",
                                  example_input=example, calibration=splits.train,
                                  config=QuantizeConfig(calibration_samples=64), batches=(1, 4))
    assert again.reused and again.float_nodes == choice.float_nodes and again.node_us == {}
    assert _float_weight_convs(again.path) == set(choice.float_nodes) & set(convs)
    anew = quantize_where_faster(source, tmp_path / "b2.int8.onnx", example_input=example, calibration=splits.train,
                                 config=QuantizeConfig(calibration_samples=64), batches=(2,))
    assert not anew.reused and set(convs) <= set(anew.node_us)


def test_profile_events_map_back_to_their_compute_nodes() -> None:
    from onnx import helper

    from rankshrink.deploy.quantize import _compute_node_of

    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="/stem/Conv"),
             helper.make_node("Relu", ["c"], ["r"], name="/stem/Relu"),
             helper.make_node("Conv", ["r", "w2"], ["c2"], name="/body/Conv"),
             helper.make_node("Add", ["c2", "r"], ["s"], name="/body/Add"),
             helper.make_node("Gemm", ["s", "w3"], ["y"], name="/fc/Gemm")]
    by_name = {n.name: n for n in nodes}
    producers = {out: n for n in nodes for out in n.output}
    assert _compute_node_of("/stem/Conv_token_1", by_name, producers) == "/stem/Conv"  # int8 QLinearConv
    assert _compute_node_of("r_nchwc", by_name, producers) == "/stem/Conv"  # float32 Conv+Relu, NCHWc
    assert _compute_node_of("s_nchwc", by_name, producers) == "/body/Conv"  # Conv with its fused sum
    assert _compute_node_of("/fc/Gemm", by_name, producers) == "/fc/Gemm"
    assert _compute_node_of("ReorderOutput", by_name, producers) is None
