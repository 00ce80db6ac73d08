"""ONNX files as other exporters write them, for the tests of ONNX input."""

from __future__ import annotations


def weights_as_constants(path, out) -> None:
    """Rewrite the ONNX file ``path`` to ``out`` with every weight a Constant node instead of an initializer."""
    import onnx

    model = onnx.load(str(path))
    constants = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in model.graph.initializer]
    del model.graph.initializer[:]
    nodes = constants + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
