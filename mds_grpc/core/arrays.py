"""Arrays from any wire's parts (dtype, shape, raw bytes or typed values), checked before anything is allocated.

Every front door decodes tensors through these, so limits, dtypes and shape-versus-data checks
(and their messages) are the same whatever the wire; `where` names the field the data came in.
"""

import math
from collections.abc import Sequence

import numpy as np

from mds_grpc.core import dtypes
from mds_grpc.core.errors import InvalidArgument
from mds_grpc.core.limits import TensorLimits

# Looked up once: numpy's newbyteorder costs microseconds per call.
LITTLE_ENDIAN = {d.name: d.numpy.newbyteorder("<") for d in dtypes.DTYPES}


def checked_shape(name: str, shape: Sequence[int], limits: TensorLimits) -> tuple[int, ...]:
    shape = tuple(shape)
    limits.check_rank(name, shape)
    if shape and min(shape) < 0:
        raise InvalidArgument(f"tensor {name!r} has a negative dimension in shape {list(shape)}")
    return shape


def _check_size(
    name: str,
    dtype: dtypes.DType,
    shape: tuple[int, ...],
    received: int,
    raw: bool,
    where: str,
    limits: TensorLimits,
    elements_so_far: int,
) -> None:
    count = math.prod(shape)
    expected = count * dtype.numpy.itemsize if raw else count
    if received != expected:
        unit = f"bytes of {where}" if raw else f"values in {where}"
        raise InvalidArgument(
            f"tensor {name!r} with shape {list(shape)} and dtype {dtype.name} needs {expected} {unit}, got {received}"
        )
    limits.check_elements(name, shape, count, elements_so_far)  # the data is here: judge its size


def from_raw(
    name: str,
    dtype: dtypes.DType,
    shape: tuple[int, ...],
    data: bytes,
    where: str,
    limits: TensorLimits,
    elements_so_far: int = 0,
) -> np.ndarray:
    """A fixed-size dtype's little-endian bytes, as an array over them (no copy)."""
    _check_size(name, dtype, shape, len(data), True, where, limits, elements_so_far)
    return np.frombuffer(data, dtype=LITTLE_ENDIAN[dtype.name]).reshape(shape)


def from_values(
    name: str,
    dtype: dtypes.DType,
    shape: tuple[int, ...],
    values: Sequence,
    where: str,
    limits: TensorLimits,
    elements_so_far: int = 0,
) -> np.ndarray:
    """Typed values (ints, floats or bools, wider than the dtype on the wire), range-checked."""
    _check_size(name, dtype, shape, len(values), False, where, limits, elements_so_far)
    kind = dtype.numpy.kind
    wide = np.array(values, dtype={"i": np.int64, "u": np.uint64}.get(kind, dtype.numpy))
    if kind in "iu" and wide.size:
        info = np.iinfo(dtype.numpy)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidArgument(f"tensor {name!r} has values outside the {dtype.name} range")
    return wide.astype(dtype.numpy, copy=False).reshape(shape)


def from_strings(
    name: str,
    shape: tuple[int, ...],
    values: Sequence[bytes],
    where: str,
    limits: TensorLimits,
    elements_so_far: int = 0,
) -> np.ndarray:
    """STRING elements (UTF-8 bytes) as an object array of str."""
    _check_size(name, dtypes.BY_NAME["STRING"], shape, len(values), False, where, limits, elements_so_far)
    limits.check_string(name, max(map(len, values), default=0))
    try:
        decoded = [v.decode("utf-8") for v in values]
    except UnicodeDecodeError:
        raise InvalidArgument(f"tensor {name!r} has a STRING element that is not UTF-8") from None
    return np.array(decoded, dtype=object).reshape(shape)


def raw_bytes(array: np.ndarray, dtype: dtypes.DType) -> bytes:
    """A fixed-size dtype's elements as little-endian bytes, row-major."""
    return np.ascontiguousarray(array, dtype=LITTLE_ENDIAN[dtype.name]).tobytes()


def string_elements(array: np.ndarray) -> list[bytes]:
    """A STRING array's elements as UTF-8 bytes, row-major."""
    return [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in array.ravel()]
