"""mds.v1 Tensor <-> numpy, checked against shape and dtype before anything is allocated."""

import math

import numpy as np

from mds.v1 import tensor_pb2
from mds_grpc.core import dtypes
from mds_grpc.core.errors import InvalidArgument
from mds_grpc.core.limits import TensorLimits

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


# Looked up once: protobuf's enum helpers and numpy's newbyteorder cost microseconds per call.
WIRE_OF = {d.name: DataType.Value(PREFIX + d.name) for d in dtypes.DTYPES}
BY_WIRE = {value: dtypes.BY_NAME[name] for name, value in WIRE_OF.items()}
LITTLE_ENDIAN = {d.name: d.numpy.newbyteorder("<") for d in dtypes.DTYPES}


def to_wire_dtype(name: str | None) -> int:
    return WIRE_OF[name] if name else DataType.DATA_TYPE_UNSPECIFIED


def from_wire_dtype(value: int, tensor_name: str) -> dtypes.DType:
    dtype = BY_WIRE.get(value)
    if dtype is None:
        raise InvalidArgument(f"tensor {tensor_name!r} needs a dtype (got {value})")
    return dtype


def to_array(tensor: tensor_pb2.Tensor, limits: TensorLimits = TensorLimits(), elements_so_far: int = 0) -> np.ndarray:
    """Decode one tensor; raise InvalidArgument naming it when shape, dtype and data disagree,
    ResourceExhausted when it goes over `limits` (both before allocating anything)."""
    name = tensor.name
    dtype = from_wire_dtype(tensor.dtype, name)
    shape = tuple(tensor.shape)
    raw_data = tensor.raw_data  # read once: each read of a bytes field copies it
    limits.check_rank(name, shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"tensor {name!r} has a negative dimension in shape {list(shape)}")
    count = math.prod(shape)
    has_contents = tensor.HasField("contents") and tensor.contents.ByteSize() > 0
    if raw_data and has_contents:
        raise InvalidArgument(f"tensor {name!r} sets both raw_data and contents; send exactly one")
    if dtype.name == "STRING" and raw_data:
        raise InvalidArgument(f"tensor {name!r} is STRING: send its elements in contents.bytes_contents")
    if dtype.name not in CONTENTS_FIELD and dtype.name != "STRING" and has_contents:
        raise InvalidArgument(f"tensor {name!r} is {dtype.name}, which travels only as raw_data")
    raw = bool(raw_data) or dtype.name not in CONTENTS_FIELD
    stray = [] if raw else [f.name for f, _ in tensor.contents.ListFields() if f.name != CONTENTS_FIELD[dtype.name]]
    if stray:
        raise InvalidArgument(f"tensor {name!r} is {dtype.name}: its values belong in "
                              f"contents.{CONTENTS_FIELD[dtype.name]}, not {stray[0]}")
    received = len(raw_data) if raw else len(getattr(tensor.contents, CONTENTS_FIELD[dtype.name]))
    expected = count * dtype.numpy.itemsize if raw else count
    if received != expected:
        where = "bytes of raw_data" if raw else f"values in contents.{CONTENTS_FIELD[dtype.name]}"
        raise InvalidArgument(f"tensor {name!r} with shape {list(shape)} and dtype {dtype.name} needs "
                              f"{expected} {where}, got {received}")
    limits.check_elements(name, shape, count, elements_so_far)  # the data is here: judge its size
    if dtype.name == "STRING":
        return _strings(tensor, limits)
    if raw:
        return np.frombuffer(raw_data, dtype=LITTLE_ENDIAN[dtype.name]).reshape(shape)
    return _from_contents(tensor, dtype)


def to_arrays(tensors, limits: TensorLimits = TensorLimits()) -> dict[str, np.ndarray]:
    """Decode tensors by name; a name given twice is INVALID_ARGUMENT; `limits` hold for them all."""
    limits.check_inputs(len(tensors))
    arrays, elements = {}, 0
    for tensor in tensors:
        if tensor.name in arrays:
            raise InvalidArgument(f"input {tensor.name!r} is given twice")
        arrays[tensor.name] = to_array(tensor, limits, elements)
        elements += arrays[tensor.name].size
    return arrays


def _from_contents(tensor: tensor_pb2.Tensor, dtype: dtypes.DType) -> np.ndarray:
    values = getattr(tensor.contents, CONTENTS_FIELD[dtype.name])
    kind = dtype.numpy.kind
    wide = np.array(values, dtype={"i": np.int64, "u": np.uint64}.get(kind, dtype.numpy))
    if kind in "iu" and wide.size:
        info = np.iinfo(dtype.numpy)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidArgument(f"tensor {tensor.name!r} has values outside the {dtype.name} range")
    return wide.astype(dtype.numpy, copy=False).reshape(tensor.shape)


def _strings(tensor: tensor_pb2.Tensor, limits: TensorLimits) -> np.ndarray:
    values = tensor.contents.bytes_contents
    limits.check_string(tensor.name, max(map(len, values), default=0))
    try:
        decoded = [v.decode("utf-8") for v in values]
    except UnicodeDecodeError:
        raise InvalidArgument(f"tensor {tensor.name!r} has a STRING element that is not UTF-8") from None
    return np.array(decoded, dtype=object).reshape(tensor.shape)


def from_array(name: str, array: np.ndarray, raw: bool, into: tensor_pb2.Tensor | None = None) -> tensor_pb2.Tensor:
    """Encode one array (into a new Tensor, or `into`, which saves a copy when it is part of a reply);
    FP16/BF16 always raw, STRING always as bytes_contents."""
    array = np.asarray(array)
    dtype = dtypes.of_array(array)
    if dtype is None:
        raise TypeError(f"output {name!r} has unsupported dtype {array.dtype}")
    tensor = tensor_pb2.Tensor() if into is None else into
    tensor.name, tensor.dtype = name, WIRE_OF[dtype.name]
    tensor.shape.extend(array.shape)
    if dtype.name == "STRING":
        tensor.contents.bytes_contents.extend(
            v if isinstance(v, bytes) else str(v).encode("utf-8") for v in array.ravel()
        )
    elif raw or dtype.name not in CONTENTS_FIELD:
        tensor.raw_data = np.ascontiguousarray(array, dtype=LITTLE_ENDIAN[dtype.name]).tobytes()
    else:
        getattr(tensor.contents, CONTENTS_FIELD[dtype.name]).extend(array.ravel().tolist())
    return tensor
