""".npy files streamed: the header read with numpy.lib.format once it has arrived, then the raw rows."""

import io
from collections.abc import Iterator

import numpy as np
from numpy.lib import format as npy

from mds_grpc.core import dtypes
from mds_grpc.core.errors import InvalidArgument
from mds_grpc.core.jobs import ColumnSpec

PIECE_BYTES = 1 << 20  # an .npy download's largest message
_PREFIX = {(1, 0): 10, (2, 0): 12}  # magic, version and header length: bytes before the header's text
MAX_HEADER_BYTES = 10_000  # of the header's text, after the prefix: numpy's own limit for reading one safely


class NpyStream:
    """Turns the pieces of one .npy file, as they arrive, into (column, next little-endian C-order bytes)."""

    def __init__(self, name: str):
        self.name = name
        self.head = b""
        self.spec: ColumnSpec | None = None
        self.swap: np.dtype | None = None  # a big-endian dtype, whose items are swapped
        self.carry = b""  # the bytes of an item cut in two by a piece, when swapping

    def feed(self, data: bytes) -> Iterator[tuple[ColumnSpec, bytes]]:
        if self.spec is None:
            self.head += data
            if not self._read_header():
                return
            data, self.head = self.head, b""
            assert self.spec is not None
        if self.swap is not None:
            data, cut = self.carry + data, (len(self.carry) + len(data)) % self.swap.itemsize
            data, self.carry = data[: len(data) - cut], data[len(data) - cut :]
            data = np.frombuffer(data, self.swap).astype(self.swap.newbyteorder("<")).tobytes()
        yield self.spec, data

    def _read_header(self) -> bool:
        """Parse the header once it is whole (keeping the bytes after it in self.head); False before."""
        if len(self.head) < 8:
            self._check_magic()
            return False
        self._check_magic()
        version = (self.head[6], self.head[7])
        if version not in _PREFIX:
            raise InvalidArgument(f"input {self.name!r}: .npy version {version} is not supported; use 1.0 or 2.0")
        prefix = _PREFIX[version]
        if len(self.head) < prefix:
            return False
        text = int.from_bytes(self.head[8:prefix], "little")
        if text > MAX_HEADER_BYTES:
            raise InvalidArgument(f"input {self.name!r} has an .npy header of {text} bytes; at most {MAX_HEADER_BYTES}")
        size = prefix + text
        if len(self.head) < size:
            return False
        handle = io.BytesIO(self.head[:size])
        npy.read_magic(handle)
        read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        try:
            shape, fortran_order, dtype = read(handle)
        except ValueError as error:
            raise InvalidArgument(f"input {self.name!r}: malformed .npy header: {error}") from None
        self.spec = self._column(shape, fortran_order, dtype)
        if dtype.byteorder == ">":
            self.swap = dtype
        self.head = self.head[size:]
        return True

    def _check_magic(self) -> None:
        if not npy.MAGIC_PREFIX.startswith(self.head[:6]):
            raise InvalidArgument(f"input {self.name!r} is not an .npy file (it does not start with \\x93NUMPY)")

    def _column(self, shape: tuple[int, ...], fortran_order: bool, dtype: np.dtype) -> ColumnSpec:
        kind = dtypes.BY_NUMPY.get(dtype.newbyteorder("="))
        if dtype.hasobject or kind is None or kind.name == "STRING":
            raise InvalidArgument(f"input {self.name!r} has dtype {dtype}; jobs take numeric and boolean arrays")
        if fortran_order and len(shape) > 1:
            raise InvalidArgument(f"input {self.name!r} is in Fortran order; save it in C order (np.ascontiguousarray)")
        return ColumnSpec(self.name, kind.name, tuple(shape))

    def close(self) -> None:
        """At the end of the file: INVALID_ARGUMENT when it ended inside its header (or an item)."""
        if self.spec is None:
            raise InvalidArgument(f"input {self.name!r} ends before its .npy header does")
        if self.carry:
            raise InvalidArgument(f"input {self.name!r} ends inside an array element")


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The header of an .npy file of little-endian `dtype` items in `shape`, C order."""
    handle = io.BytesIO()
    npy.write_array_header_1_0(
        handle, {"descr": npy.dtype_to_descr(dtype.newbyteorder("<")), "fortran_order": False, "shape": shape}
    )
    return handle.getvalue()


def row_pieces(array: np.ndarray) -> Iterator[bytes]:
    """An array's rows as little-endian C-order bytes, in pieces of at most PIECE_BYTES."""
    data = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).reshape(-1).view(np.uint8)
    for start in range(0, len(data), PIECE_BYTES):
        yield data[start : start + PIECE_BYTES].tobytes()
