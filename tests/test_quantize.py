"""int8 on top of an exported model (dynamic and static QDQ), and the side-by-side measurement of ONNX files."""

from __future__ import annotations

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
