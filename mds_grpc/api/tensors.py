"""mds.v1 Tensor <-> numpy, checked (by core.arrays) against shape and dtype before anything is allocated."""

from collections.abc import Sequence
from typing import cast

import numpy as np

from mds.v1 import tensor_pb2
from mds_grpc.core import arrays, dtypes
from mds_grpc.core.errors import InvalidArgument
from mds_grpc.core.limits import TensorLimits

DataType = tensor_pb2.DataType
PREFIX = "DATA_TYPE_"

# The TensorContents field that carries each dtype; FP16 and BF16 have none (raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "STRING": "bytes_contents",
}


# Looked up once: protobuf's enum helpers cost microseconds per call. (Value() is typed int, the
# generated .pyi types an enum's values as the enum: the same numbers.)
WIRE_OF = {d.name: cast(DataType, DataType.Value(PREFIX + d.name)) for d in dtypes.DTYPES}
BY_WIRE: dict[int, dtypes.DType] = {value: dtypes.BY_NAME[name] for name, value in WIRE_OF.items()}


def to_wire_dtype(name: str | None) -> DataType:
    return WIRE_OF[name] if name else DataType.DATA_TYPE_UNSPECIFIED


def from_wire_dtype(value: int, tensor_name: str) -> dtypes.DType:
    dtype = BY_WIRE.get(value)
    if dtype is None:
        raise InvalidArgument(f"tensor {tensor_name!r} needs a dtype (got {value})")
    return dtype


def typed_values(name: str, dtype: dtypes.DType, contents, raw_field: str) -> Sequence:
    """The values a tensor's typed contents (mds.v1 or V2: same field names) hold for its dtype."""
    field = CONTENTS_FIELD.get(dtype.name)
    if field is None:
        raise InvalidArgument(f"tensor {name!r} is {dtype.name}, which travels only as {raw_field}")
    stray = [f.name for f, _ in contents.ListFields() if f.name != field]
    if stray:
        raise InvalidArgument(f"tensor {name!r} is {dtype.name}: its values belong in contents.{field}, not {stray[0]}")
    return getattr(contents, field)


def from_typed(
    name: str,
    dtype: dtypes.DType,
    shape: tuple[int, ...],
    contents,
    raw_field: str,
    limits: TensorLimits,
    elements_so_far: int,
) -> np.ndarray:
    values = typed_values(name, dtype, contents, raw_field)
    where = f"contents.{CONTENTS_FIELD[dtype.name]}"
    if dtype.name == "STRING":
        return arrays.from_strings(name, shape, values, where, limits, elements_so_far)
    return arrays.from_values(name, dtype, shape, values, where, limits, elements_so_far)


def fill_typed(contents, dtype: dtypes.DType, array: np.ndarray) -> None:
    """Put an array's elements in the typed contents field of its dtype (which must have one)."""
    values = arrays.string_elements(array) if dtype.name == "STRING" else array.ravel().tolist()
    getattr(contents, CONTENTS_FIELD[dtype.name]).extend(values)


def to_array(tensor: tensor_pb2.Tensor, limits: TensorLimits = TensorLimits(), elements_so_far: int = 0) -> np.ndarray:
    """Decode one tensor; raise InvalidArgument naming it when shape, dtype and data disagree,
    ResourceExhausted when it goes over `limits` (both before allocating anything)."""
    name = tensor.name
    dtype = from_wire_dtype(tensor.dtype, name)
    shape = arrays.checked_shape(name, tensor.shape, limits)
    raw_data = tensor.raw_data  # read once: each read of a bytes field copies it
    has_contents = tensor.HasField("contents") and tensor.contents.ByteSize() > 0
    if raw_data and has_contents:
        raise InvalidArgument(f"tensor {name!r} sets both raw_data and contents; send exactly one")
    if dtype.name == "STRING" and raw_data:
        raise InvalidArgument(f"tensor {name!r} is STRING: send its elements in contents.bytes_contents")
    if has_contents or not raw_data and dtype.name in CONTENTS_FIELD:
        return from_typed(name, dtype, shape, tensor.contents, "raw_data", limits, elements_so_far)
    return arrays.from_raw(name, dtype, shape, raw_data, "raw_data", limits, elements_so_far)


def to_arrays(tensors, limits: TensorLimits = TensorLimits()) -> dict[str, np.ndarray]:
    """Decode tensors by name; a name given twice is INVALID_ARGUMENT; `limits` hold for them all."""
    limits.check_inputs(len(tensors))
    decoded: dict[str, np.ndarray] = {}
    elements = 0
    for tensor in tensors:
        if tensor.name in decoded:
            raise InvalidArgument(f"input {tensor.name!r} is given twice")
        decoded[tensor.name] = to_array(tensor, limits, elements)
        elements += decoded[tensor.name].size
    return decoded


def from_array(name: str, array: np.ndarray, raw: bool, into: tensor_pb2.Tensor | None = None) -> tensor_pb2.Tensor:
    """Encode one array (into a new Tensor, or `into`, which saves a copy when it is part of a reply);
    FP16/BF16 always raw, STRING always as bytes_contents."""
    array = np.asarray(array)
    dtype = dtypes.of_output(name, array)
    tensor = tensor_pb2.Tensor() if into is None else into
    tensor.name, tensor.dtype = name, WIRE_OF[dtype.name]
    tensor.shape.extend(array.shape)
    if dtype.name != "STRING" and (raw or dtype.name not in CONTENTS_FIELD):
        tensor.raw_data = arrays.raw_bytes(array, dtype)
    else:
        fill_typed(tensor.contents, dtype, array)
    return tensor
