"""Benchmark models, built here so every run uses the same bytes."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def mlp(inputs: int = 784, hidden: int = 256, outputs: int = 10, seed: int = 0) -> bytes:
    """The fp32 MLP inputs -> hidden (ReLU) -> outputs, with a symbolic batch dimension."""
    rng = np.random.default_rng(seed)
    weights = [
        numpy_helper.from_array((rng.standard_normal((inputs, hidden)) / 28).astype(np.float32), "w1"),
        numpy_helper.from_array(np.zeros(hidden, np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((hidden, outputs)) / 16).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(outputs, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["l0"]),
        helper.make_node("Add", ["l0", "b2"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", inputs])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", outputs])],
                              initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="mds-bench")
    model.ir_version = 8
    return model.SerializeToString()
