"""mds.v1 Tensor <-> numpy, checked against shape and dtype before anything is allocated."""

import math

import numpy as np

from mds.v1 import tensor_pb2
from mds_grpc.core import dtypes
from mds_grpc.core.errors import InvalidArgument

DataType = tensor_pb2.DataType
PREFIX = "DATA_TYPE_"

# The TensorContents field that carries each dtype; FP16 and BF16 have none (raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "STRING": "bytes_contents",
}


def to_wire_dtype(name: str | None) -> int:
    return DataType.Value(PREFIX + name) if name else DataType.DATA_TYPE_UNSPECIFIED


def from_wire_dtype(value: int, tensor_name: str) -> dtypes.DType:
    if value == DataType.DATA_TYPE_UNSPECIFIED or value not in DataType.values():
        raise InvalidArgument(f"tensor {tensor_name!r} needs a dtype (got {value})")
    return dtypes.BY_NAME[DataType.Name(value)[len(PREFIX):]]


def to_array(tensor: tensor_pb2.Tensor) -> np.ndarray:
    """Decode one tensor; raise InvalidArgument naming it when shape, dtype and data disagree."""
    name = tensor.name
    dtype = from_wire_dtype(tensor.dtype, name)
    if any(d < 0 for d in tensor.shape):
        raise InvalidArgument(f"tensor {name!r} has a negative dimension in shape {list(tensor.shape)}")
    count = math.prod(tensor.shape)
    has_contents = tensor.HasField("contents") and tensor.contents.ByteSize() > 0
    if tensor.raw_data and has_contents:
        raise InvalidArgument(f"tensor {name!r} sets both raw_data and contents; send exactly one")
    if dtype.name == "STRING":
        if tensor.raw_data:
            raise InvalidArgument(f"tensor {name!r} is STRING: send its elements in contents.bytes_contents")
        return _strings(tensor, count)
    if dtype.name not in CONTENTS_FIELD and has_contents:
        raise InvalidArgument(f"tensor {name!r} is {dtype.name}, which travels only as raw_data")
    if tensor.raw_data or dtype.name not in CONTENTS_FIELD:
        return _from_raw(tensor, dtype, count)
    return _from_contents(tensor, dtype, count)


def to_arrays(tensors) -> dict[str, np.ndarray]:
    """Decode tensors by name; a name given twice is INVALID_ARGUMENT."""
    arrays = {}
    for tensor in tensors:
        if tensor.name in arrays:
            raise InvalidArgument(f"input {tensor.name!r} is given twice")
        arrays[tensor.name] = to_array(tensor)
    return arrays


def _from_raw(tensor: tensor_pb2.Tensor, dtype: dtypes.DType, count: int) -> np.ndarray:
    expected = count * dtype.numpy.itemsize
    if len(tensor.raw_data) != expected:
        raise InvalidArgument(
            f"tensor {tensor.name!r} with shape {list(tensor.shape)} and dtype {dtype.name} needs "
            f"{expected} bytes of raw_data, got {len(tensor.raw_data)}"
        )
    return np.frombuffer(tensor.raw_data, dtype=dtype.numpy.newbyteorder("<")).reshape(tensor.shape)


def _from_contents(tensor: tensor_pb2.Tensor, dtype: dtypes.DType, count: int) -> np.ndarray:
    field = CONTENTS_FIELD[dtype.name]
    stray = [f.name for f, _ in tensor.contents.ListFields() if f.name != field]
    if stray:
        raise InvalidArgument(f"tensor {tensor.name!r} is {dtype.name}: its values belong in contents.{field}, not {stray[0]}")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidArgument(
            f"tensor {tensor.name!r} with shape {list(tensor.shape)} needs {count} values in contents.{field}, "
            f"got {len(values)}"
        )
    kind = dtype.numpy.kind
    wide = np.array(values, dtype={"i": np.int64, "u": np.uint64}.get(kind, dtype.numpy))
    if kind in "iu" and wide.size:
        info = np.iinfo(dtype.numpy)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidArgument(f"tensor {tensor.name!r} has values outside the {dtype.name} range")
    return wide.astype(dtype.numpy, copy=False).reshape(tensor.shape)


def _strings(tensor: tensor_pb2.Tensor, count: int) -> np.ndarray:
    values = tensor.contents.bytes_contents
    if len(values) != count:
        raise InvalidArgument(
            f"tensor {tensor.name!r} with shape {list(tensor.shape)} needs {count} values in "
            f"contents.bytes_contents, got {len(values)}"
        )
    try:
        decoded = [v.decode("utf-8") for v in values]
    except UnicodeDecodeError:
        raise InvalidArgument(f"tensor {tensor.name!r} has a STRING element that is not UTF-8") from None
    return np.array(decoded, dtype=object).reshape(tensor.shape)


def from_array(name: str, array: np.ndarray, raw: bool) -> tensor_pb2.Tensor:
    """Encode one array; FP16/BF16 always raw, STRING always as bytes_contents."""
    array = np.asarray(array)
    dtype = dtypes.of_array(array)
    if dtype is None:
        raise TypeError(f"output {name!r} has unsupported dtype {array.dtype}")
    tensor = tensor_pb2.Tensor(name=name, dtype=to_wire_dtype(dtype.name), shape=array.shape)
    if dtype.name == "STRING":
        tensor.contents.bytes_contents.extend(
            v if isinstance(v, bytes) else str(v).encode("utf-8") for v in array.ravel()
        )
    elif raw or dtype.name not in CONTENTS_FIELD:
        tensor.raw_data = np.ascontiguousarray(array, dtype=dtype.numpy.newbyteorder("<")).tobytes()
    else:
        getattr(tensor.contents, CONTENTS_FIELD[dtype.name]).extend(array.ravel().tolist())
    return tensor
