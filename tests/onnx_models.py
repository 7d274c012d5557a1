"""Small ONNX models built for tests, each exercising one feature of the contract."""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]

# (core dtype name, ONNX element type) for every dtype of the contract.
ALL_DTYPES = [
    ("BOOL", TensorProto.BOOL),
    ("UINT8", TensorProto.UINT8),
    ("UINT16", TensorProto.UINT16),
    ("UINT32", TensorProto.UINT32),
    ("UINT64", TensorProto.UINT64),
    ("INT8", TensorProto.INT8),
    ("INT16", TensorProto.INT16),
    ("INT32", TensorProto.INT32),
    ("INT64", TensorProto.INT64),
    ("FP16", TensorProto.FLOAT16),
    ("FP32", TensorProto.FLOAT),
    ("FP64", TensorProto.DOUBLE),
    ("BF16", TensorProto.BFLOAT16),
    ("STRING", TensorProto.STRING),
]


def _model(nodes, inputs, outputs, initializers=(), opsets=OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="mds-tests")
    model.ir_version = 8
    return model


def identity_all_dtypes(names=tuple(n for n, _ in ALL_DTYPES)) -> bytes:
    """One Identity per dtype in `names`: input `x_<DTYPE>` [N, 2] -> output `y_<DTYPE>`."""
    chosen = [(n, t) for n, t in ALL_DTYPES if n in names]
    inputs = [helper.make_tensor_value_info(f"x_{n}", t, ["n", 2]) for n, t in chosen]
    outputs = [helper.make_tensor_value_info(f"y_{n}", t, ["n", 2]) for n, t in chosen]
    nodes = [helper.make_node("Identity", [f"x_{n}"], [f"y_{n}"]) for n, _ in chosen]
    return _model(nodes, inputs, outputs).SerializeToString()


def add_scalar() -> bytes:
    """y = x + s, with `s` a 0-d float and `x` of any length (empty too)."""
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]),
        helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])]
    return _model([helper.make_node("Add", ["x", "s"], ["y"])], inputs, outputs).SerializeToString()


def add_two(scale: float = 1.0) -> bytes:
    """z = (a + b) * scale for float vectors of symbolic lengths (mismatched lengths fail at run time)."""
    inputs = [
        helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n"]),
        helper.make_tensor_value_info("b", TensorProto.FLOAT, ["m"]),
    ]
    outputs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)]
    nodes = [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Mul", ["sum", "k"], ["z"])]
    scale_init = numpy_helper.from_array(np.array(scale, dtype=np.float32), "k")
    return _model(nodes, inputs, outputs, [scale_init]).SerializeToString()


def string_labels() -> bytes:
    """LabelEncoder from ai.onnx.ml: strings -> int64 ids (unknown -> -1)."""
    inputs = [helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])]
    outputs = [helper.make_tensor_value_info("id", TensorProto.INT64, ["n"])]
    node = helper.make_node(
        "LabelEncoder",
        ["text"],
        ["id"],
        domain="ai.onnx.ml",
        keys_strings=["cat", "dog", "émeu"],
        values_int64s=[1, 2, 3],
        default_int64=-1,
    )
    opsets = [*OPSET, helper.make_opsetid("ai.onnx.ml", 2)]
    return _model([node], inputs, outputs, opsets=opsets).SerializeToString()


def half_precision() -> bytes:
    """fp16 in; the same values as fp16 and widened to fp32 out."""
    inputs = [helper.make_tensor_value_info("h", TensorProto.FLOAT16, ["n", 3])]
    outputs = [
        helper.make_tensor_value_info("same", TensorProto.FLOAT16, ["n", 3]),
        helper.make_tensor_value_info("wide", TensorProto.FLOAT, ["n", 3]),
    ]
    nodes = [
        helper.make_node("Identity", ["h"], ["same"]),
        helper.make_node("Cast", ["h"], ["wide"], to=TensorProto.FLOAT),
    ]
    return _model(nodes, inputs, outputs).SerializeToString()


def save_with_external_data(folder: Path, location: str = "model.onnx.data", rows: int = 64, columns: int = 32) -> Path:
    """A MatMul whose rows x columns weight lives in an external-data side file; returns the .onnx path."""
    weight = np.random.default_rng(7).standard_normal((rows, columns)).astype(np.float32)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", rows])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", columns])]
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], inputs, outputs, [numpy_helper.from_array(weight, "w")]
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0
    )
    return path


def pointing_outside(location: str) -> bytes:
    """A model whose weight claims to live at `location` (e.g. absolute or with '..')."""
    weight = numpy_helper.from_array(np.zeros((4, 4), dtype=np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "64")):
        weight.external_data.add(key=key, value=value)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"])], inputs, outputs, [weight]).SerializeToString()


def sklearn_classifier() -> bytes:
    """A scikit-learn logistic regression converted by skl2onnx, with its ZipMap output."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    features = rng.standard_normal((60, 4)).astype(np.float32)
    labels = (features[:, 0] + features[:, 1] > 0).astype(np.int64) + (features[:, 2] > 1)
    classifier = LogisticRegression(max_iter=500).fit(features, labels)
    return to_onnx(classifier, features[:1], target_opset={"": 17, "ai.onnx.ml": 3}).SerializeToString()


def dense(features: int = 8, classes: int = 3, seed: int = 0, input_name: str = "x") -> bytes:
    """A small classifier over rows: scores = x @ w + b [N, classes] and their argmax [N]."""
    rng = np.random.default_rng(seed)
    weights = numpy_helper.from_array(rng.standard_normal((features, classes)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "b")
    inputs = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["rows", features])]
    outputs = [
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["rows", classes]),
        helper.make_tensor_value_info("label", TensorProto.INT64, ["rows"]),
    ]
    nodes = [
        helper.make_node("MatMul", [input_name, "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["scores"]),
        helper.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=0),
    ]
    return _model(nodes, inputs, outputs, [weights, bias]).SerializeToString()


def fails_unless_rows_divide_by_four() -> bytes:
    """Reshapes x [N, 2] to [4, -1]: onnxruntime fails at run time when 2N is not a multiple of 4."""
    shape = numpy_helper.from_array(np.array([4, -1], dtype=np.int64), "shape")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 2])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, None])]
    return _model([helper.make_node("Reshape", ["x", "shape"], ["y"])], inputs, outputs, [shape]).SerializeToString()


def outer_product() -> bytes:
    """y = x @ x.T for x [N, 1]: a batch of N rows has rows of N elements, so batches differ in row shape."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 1])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", "columns"])]
    nodes = [helper.make_node("Transpose", ["x"], ["xt"]), helper.make_node("MatMul", ["x", "xt"], ["y"])]
    return _model(nodes, inputs, outputs).SerializeToString()


def custom_op() -> bytes:
    """A node from a custom-op domain that no loaded library implements (MDS never loads any)."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]
    opsets = [*OPSET, helper.make_opsetid("com.example.custom", 1)]
    node = helper.make_node("Exfiltrate", ["x"], ["y"], domain="com.example.custom")
    return _model([node], inputs, outputs, opsets=opsets).SerializeToString()


def missing_input(name: str = "ghost") -> bytes:
    """An Add that reads `name`, which no input, initializer or node defines: onnxruntime cannot load it."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]
    return _model([helper.make_node("Add", ["x", name], ["y"])], inputs, outputs).SerializeToString()


def huge_weight(holder: str) -> bytes:
    """y = x + w, with w declaring 10**12 floats: 4 bytes of it in an initializer ("raw") or a Constant
    node ("constant"), none at all ("empty"), or external data in "w.bin" ("external", upload 64 bytes)."""
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[10**12])  # helper.make_tensor would refuse
    if holder in ("raw", "constant"):
        weight.raw_data = b"\0" * 4
    if holder == "external":
        weight.data_location = TensorProto.EXTERNAL
        weight.external_data.add(key="location", value="w.bin")
    nodes = [helper.make_node("Add", ["x", "w"], ["y"])]
    if holder == "constant":
        nodes.insert(0, helper.make_node("Constant", [], ["w"], value=weight))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    return _model(nodes, inputs, outputs, [] if holder == "constant" else [weight]).SerializeToString()


def sized_by_input(op: str) -> bytes:
    """ConstantOfShape(shape) or Expand(one, shape): an output of whatever shape the client sends (0s or 1s)."""
    one = numpy_helper.from_array(np.ones(1, np.float32), "one")
    node = (
        helper.make_node("ConstantOfShape", ["shape"], ["y"])
        if op == "ConstantOfShape"
        else helper.make_node("Expand", ["one", "shape"], ["y"])
    )
    inputs = [helper.make_tensor_value_info("shape", TensorProto.INT64, ["rank"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    return _model([node], inputs, outputs, [one] if op == "Expand" else []).SerializeToString()
