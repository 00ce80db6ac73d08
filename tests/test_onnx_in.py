"""ONNX in: ONNX files (exported here from small torch models) converted back to torch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx", reason="ONNX-in tests need onnx (pip install 'rankshrink[onnx]')")
pytest.importorskip("onnxruntime", reason="ONNX-in tests need onnxruntime (pip install 'rankshrink[onnx]')")

from onnx_files import weights_as_constants  # noqa: E402
from rankshrink import Plan, apply  # noqa: E402
from rankshrink.cost import count  # noqa: E402
from rankshrink.deploy import export_onnx  # noqa: E402
from rankshrink.errors import ConfigError, FileFormatError  # noqa: E402
from rankshrink.files import file_sha256  # noqa: E402
from rankshrink.models import load_model_spec  # noqa: E402
from rankshrink.models.onnx_in import constants_to_initializers, require_onnx2torch  # noqa: E402

try:
    require_onnx2torch()
    HAVE_ONNX2TORCH = True
except ConfigError:
    HAVE_ONNX2TORCH = False
needs_onnx2torch = pytest.mark.skipif(not HAVE_ONNX2TORCH, reason="needs onnx2torch (pip install onnx2torch)")


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


@needs_onnx2torch
def test_converted_model_reproduces_the_original(tmp_path) -> None:
    model = _cnn()
    x = torch.randn(5, 3, 8, 8)
    path = export_onnx(model, x[:2], tmp_path / "model.onnx")
    before = file_sha256(path)
    converted = load_model_spec(str(path))
    assert file_sha256(path) == before
    torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
    # The layers are real torch layers, so they are factorization candidates and compress like any model.
    rows = count(converted, x).layers
    assert [row.type for row in rows] == ["Conv2d", "Linear", "Linear"]
    plan = Plan.from_mapping({rows[0].name: ("tucker2", 8), rows[1].name: ("svd", 32)})  # full ranks: exact
    torch.testing.assert_close(apply(converted, plan)(x), model(x), rtol=1e-4, atol=1e-4)


@needs_onnx2torch
def test_weights_in_constant_nodes_are_converted(tmp_path) -> None:
    from onnx2torch import convert

    model = _cnn()
    x = torch.randn(3, 3, 8, 8)
    export_onnx(model, x[:2], tmp_path / "model.onnx")
    weights_as_constants(tmp_path / "model.onnx", tmp_path / "constants.onnx")
    # onnx2torch alone cannot build a Conv2d from a Constant-node weight ...
    with pytest.raises(KeyError):
        convert(onnx.load(str(tmp_path / "constants.onnx")))
    # ... after the move it can, and the model is the same.
    converted = load_model_spec(str(tmp_path / "constants.onnx"))
    torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
    assert sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in converted.modules()) == 3
    loaded = onnx.load(str(tmp_path / "constants.onnx"))
    count_constants = sum(node.op_type == "Constant" for node in loaded.graph.node)
    assert constants_to_initializers(loaded) == count_constants
    assert not any(node.op_type == "Constant" for node in loaded.graph.node)


@needs_onnx2torch
def test_unsupported_ops_are_listed_by_name(tmp_path) -> None:
    inputs = [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 4])]
    outputs = [onnx.helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [1, 4])]
    nodes = [onnx.helper.make_node("Relu", ["input"], ["a"]),
             onnx.helper.make_node("FrobnicateA", ["a"], ["b"], domain="com.example"),
             onnx.helper.make_node("FrobnicateB", ["b"], ["output"], domain="com.example")]
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", inputs, outputs),
                                   opset_imports=[onnx.helper.make_opsetid("", 17),
                                                  onnx.helper.make_opsetid("com.example", 1)])
    onnx.save(model, str(tmp_path / "custom.onnx"))
    with pytest.raises(FileFormatError, match="com.example::FrobnicateA, com.example::FrobnicateB;") as info:
        load_model_spec(str(tmp_path / "custom.onnx"))
    assert "\n" not in str(info.value) and "Relu" not in str(info.value)


@needs_onnx2torch
def test_bad_onnx_inputs(tmp_path) -> None:
    with pytest.raises(FileFormatError, match="does not exist"):
        load_model_spec(str(tmp_path / "missing.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(FileFormatError, match="junk.onnx"):
        load_model_spec(str(tmp_path / "junk.onnx"))
    model = _cnn()
    path = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "model.onnx")
    with pytest.raises(ConfigError, match="drop --weights"):
        load_model_spec(str(path), weights=tmp_path / "w.safetensors")


@needs_onnx2torch
def test_cli_reads_an_onnx_model(tmp_path, capsys) -> None:
    from rankshrink.cli import main

    path = export_onnx(_cnn(), torch.randn(1, 3, 8, 8), tmp_path / "model.onnx")
    assert main(["analyze", "--model", str(path), "--input-shape", "3,8,8"]) == 0
    out = capsys.readouterr().out
    assert "Conv2d" in out and "Linear" in out
