"""Tensor element types: their names, numpy dtypes and ONNX type strings."""

from dataclasses import dataclass

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class DType:
    name: str  # e.g. "FP32", as in the Open Inference Protocol ("STRING" for bytes)
    numpy: np.dtype
    onnx: str  # element type inside onnxruntime's "tensor(...)"
    onnx_enum: int  # onnx.TensorProto data type number

    @property
    def extension(self) -> bool:
        """A type numpy knows only through ml_dtypes (raw 'V' bytes to numpy itself, e.g. BF16): it travels
        only as raw bytes, and onnxruntime's numpy API and .npz files do not know it by its dtype."""
        return self.numpy.kind == "V"


DTYPES = (
    DType("BOOL", np.dtype(np.bool_), "bool", 9),
    DType("UINT8", np.dtype(np.uint8), "uint8", 2),
    DType("UINT16", np.dtype(np.uint16), "uint16", 4),
    DType("UINT32", np.dtype(np.uint32), "uint32", 12),
    DType("UINT64", np.dtype(np.uint64), "uint64", 13),
    DType("INT8", np.dtype(np.int8), "int8", 3),
    DType("INT16", np.dtype(np.int16), "int16", 5),
    DType("INT32", np.dtype(np.int32), "int32", 6),
    DType("INT64", np.dtype(np.int64), "int64", 7),
    DType("FP16", np.dtype(np.float16), "float16", 10),
    DType("FP32", np.dtype(np.float32), "float", 1),
    DType("FP64", np.dtype(np.float64), "double", 11),
    DType("BF16", np.dtype(ml_dtypes.bfloat16), "bfloat16", 16),
    DType("STRING", np.dtype(object), "string", 8),
)
BY_NAME = {d.name: d for d in DTYPES}
BY_ONNX = {d.onnx: d for d in DTYPES}
BY_NUMPY = {d.numpy: d for d in DTYPES}


def of_array(array: np.ndarray) -> DType | None:
    """The DType of a numpy array (str arrays count as STRING), or None."""
    if array.dtype.kind in "US":
        return BY_NAME["STRING"]
    return BY_NUMPY.get(array.dtype)


def of_output(name: str, array: np.ndarray) -> DType:
    """The DType of an array to send; TypeError (a fault of the server or its model) when it has none."""
    dtype = of_array(array)
    if dtype is None:
        raise TypeError(f"output {name!r} has unsupported dtype {array.dtype}")
    return dtype


def of_onnx_type(onnx_type: str) -> DType | None:
    """The DType of an onnxruntime type string like "tensor(float)", or None for non-tensors."""
    if onnx_type.startswith("tensor(") and onnx_type.endswith(")"):
        return BY_ONNX.get(onnx_type[len("tensor(") : -1])
    return None
