"""Benchmark models: built here so every run uses the same bytes, or taken from a pinned wheel."""

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from local_machine import CACHE

MODELS = CACHE / "bench-models"
RAPIDOCR = "1.4.4"
BIG_DATA = "big.onnx.data"


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
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["l0"]),
        helper.make_node("Add", ["l0", "b2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", inputs])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", outputs])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="mds-bench")
    model.ir_version = 8
    return model.SerializeToString()


def ocr_detector() -> Path:
    """PP-OCRv4's text detector (4.7 MB, NCHW float input, every dimension but channels symbolic), from the
    rapidocr-onnxruntime wheel; downloaded once into $MDS_CACHE/bench-models."""
    path = MODELS / f"rapidocr-onnxruntime-{RAPIDOCR}" / "ch_PP-OCRv4_det_infer.onnx"
    if not path.exists():
        with tempfile.TemporaryDirectory() as folder:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--no-deps",
                    "-d",
                    folder,
                    f"rapidocr-onnxruntime=={RAPIDOCR}",
                ],
                check=True,
            )
            (wheel,) = Path(folder).glob("*.whl")
            path.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(wheel) as archive:
                partial = path.with_suffix(".part")
                partial.write_bytes(archive.read(f"rapidocr_onnxruntime/models/{path.name}"))
                partial.rename(path)
    return path


def big_model(rows: int = 8192, columns: int = 32768) -> Path:
    """x[batch, rows] @ W[rows, columns]: W (1 GiB of fp32 by default) lives in the external-data file
    big.onnx.data next to big.onnx. Written once into $MDS_CACHE/bench-models."""
    folder = MODELS / f"big-{rows}x{columns}"
    path = folder / "big.onnx"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(folder / BIG_DATA, "wb") as data:
        for _ in range(0, rows, 256):
            data.write((rng.standard_normal((256, columns), np.float32) / np.sqrt(rows)).astype("<f4").tobytes())
    weights = TensorProto(
        name="w", data_type=TensorProto.FLOAT, dims=[rows, columns], data_location=TensorProto.EXTERNAL
    )
    for key, value in {"location": BIG_DATA, "offset": "0", "length": str(rows * columns * 4)}.items():
        weights.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", columns])],
        initializer=[weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="mds-bench")
    model.ir_version = 8
    path.with_suffix(".part").write_bytes(model.SerializeToString())
    path.with_suffix(".part").rename(path)
    return path


def single_file_model(mib: int) -> Path:
    """x[batch, 1024] @ W[1024, mib * 256]: W (`mib` MiB of fp32) inline in the .onnx file, so the server checks
    it in a helper process (mds_grpc/core/validation.py). Written once into $MDS_CACHE/bench-models."""
    path = MODELS / f"single-{mib}.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = mib * 256
    weights = np.random.default_rng(0).standard_normal((1024, columns), np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "single",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", columns])],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    del weights
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="mds-bench")
    model.ir_version = 8
    onnx.save_model(model, str(path.with_suffix(".part")))
    path.with_suffix(".part").rename(path)
    return path
