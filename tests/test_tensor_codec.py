"""mds.v1 Tensor <-> numpy: every dtype both ways, and every malformed tensor rejected before allocation."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import SAMPLES
from mds.v1 import tensor_pb2
from mds_grpc.api.tensors import from_array, to_array, to_arrays
from mds_grpc.core.errors import InvalidArgument, ResourceExhausted
from mds_grpc.core.limits import TensorLimits


@pytest.mark.parametrize("dtype", SAMPLES)
@pytest.mark.parametrize("raw", [True, False])
def test_every_dtype_round_trips(dtype, raw):
    array = SAMPLES[dtype]
    tensor = from_array("t", array, raw=raw)
    assert tensor.dtype == tensor_pb2.DataType.Value("DATA_TYPE_" + dtype)
    assert bool(tensor.raw_data) == (dtype in ("FP16", "BF16") or raw and dtype != "STRING")
    decoded = to_array(tensor_pb2.Tensor.FromString(tensor.SerializeToString()))
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    assert decoded.tolist() == array.tolist()


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2)])
@pytest.mark.parametrize("raw", [True, False])
def test_scalars_and_empty_tensors(shape, raw):
    array = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) + 1.5
    decoded = to_array(from_array("t", array, raw=raw))
    assert decoded.shape == shape and decoded.tolist() == array.tolist()


def _fp32(shape, raw=b"", **contents):
    return tensor_pb2.Tensor(
        name="x",
        dtype=tensor_pb2.DATA_TYPE_FP32,
        shape=shape,
        raw_data=raw,
        contents=tensor_pb2.TensorContents(**contents) if contents else None,
    )


@pytest.mark.parametrize(
    "tensor, message",
    [
        (_fp32([10**12], raw=b"\0" * 4), "needs 4000000000000 bytes of raw_data, got 4"),
        (_fp32([2, 2], raw=b"\0" * 12), "needs 16 bytes of raw_data, got 12"),
        (_fp32([2, -1], raw=b"\0" * 8), "negative dimension"),
        (_fp32([1], raw=b"\0" * 4, fp32_contents=[1.0]), "both raw_data and contents"),
        (_fp32([3], fp32_contents=[1.0, 2.0]), "needs 3 values in contents.fp32_contents, got 2"),
        (_fp32([10**12], fp32_contents=[1.0]), "needs 1000000000000 values"),
        (_fp32([1], int_contents=[1]), "belong in contents.fp32_contents, not int_contents"),
        (tensor_pb2.Tensor(name="x", shape=[1], raw_data=b"\0"), "needs a dtype"),
        (tensor_pb2.Tensor(name="x", dtype=99, shape=[1], raw_data=b"\0"), "needs a dtype"),
        (
            tensor_pb2.Tensor(
                name="x",
                dtype=tensor_pb2.DATA_TYPE_INT8,
                shape=[1],
                contents=tensor_pb2.TensorContents(int_contents=[300]),
            ),
            "outside the INT8 range",
        ),
        (
            tensor_pb2.Tensor(
                name="x",
                dtype=tensor_pb2.DATA_TYPE_UINT8,
                shape=[1],
                contents=tensor_pb2.TensorContents(uint_contents=[256]),
            ),
            "outside the UINT8 range",
        ),
        (
            tensor_pb2.Tensor(
                name="x",
                dtype=tensor_pb2.DATA_TYPE_FP16,
                shape=[1],
                contents=tensor_pb2.TensorContents(fp32_contents=[1.0]),
            ),
            "travels only as raw_data",
        ),
        (
            tensor_pb2.Tensor(name="x", dtype=tensor_pb2.DATA_TYPE_STRING, shape=[1], raw_data=b"ab"),
            "send its elements in contents.bytes_contents",
        ),
        (
            tensor_pb2.Tensor(
                name="x",
                dtype=tensor_pb2.DATA_TYPE_STRING,
                shape=[1],
                contents=tensor_pb2.TensorContents(bytes_contents=[b"\xff"]),
            ),
            "not UTF-8",
        ),
    ],
)
def test_malformed_tensors_are_invalid_arguments(tensor, message):
    with pytest.raises(InvalidArgument, match="'x'") as caught:
        to_array(tensor)
    assert message in str(caught.value)


SMALL = TensorLimits(max_inputs=2, max_rank=3, max_elements=100, max_string_bytes=4)


@pytest.mark.parametrize(
    "tensors, message",
    [
        ([_fp32([1], raw=b"\0" * 4)] * 3, "3 input tensors exceed the limit of 2 (MDS_MAX_INPUTS)"),
        ([_fp32([1, 1, 1, 1], raw=b"\0" * 4)], "rank 4, over the limit of 3 (MDS_MAX_RANK)"),
        ([_fp32([101], raw=b"\0" * 404)], "over the limit of 100 elements (MDS_MAX_ELEMENTS)"),
        ([_fp32([10**12, 0])], "shape [1000000000000, 0] takes the request over the limit of 100 elements"),
        (
            [
                tensor_pb2.Tensor(name="a", dtype=tensor_pb2.DATA_TYPE_FP32, shape=[60], raw_data=b"\0" * 240),
                tensor_pb2.Tensor(name="b", dtype=tensor_pb2.DATA_TYPE_FP32, shape=[60], raw_data=b"\0" * 240),
            ],
            "tensor 'b' with shape [60] takes the request over the limit",
        ),
        (
            [
                tensor_pb2.Tensor(
                    name="s",
                    dtype=tensor_pb2.DATA_TYPE_STRING,
                    shape=[1],
                    contents=tensor_pb2.TensorContents(bytes_contents=[b"hello"]),
                )
            ],
            "5-byte STRING element, over the limit of 4 bytes (MDS_MAX_STRING_BYTES)",
        ),
    ],
)
def test_limits_are_checked_before_decoding(tensors, message):
    with pytest.raises(ResourceExhausted) as caught:
        to_arrays(tensors, SMALL)
    assert message in str(caught.value)


DTYPE_VALUES = st.integers(min_value=-1, max_value=16)
DIMS = st.lists(st.one_of(st.integers(-2, 6), st.just(10**12), st.just(2**62)), max_size=5)
CONTENTS = st.builds(
    tensor_pb2.TensorContents,
    bool_contents=st.lists(st.booleans(), max_size=8),
    int_contents=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=8),
    int64_contents=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=8),
    uint_contents=st.lists(st.integers(0, 2**32 - 1), max_size=8),
    fp32_contents=st.lists(st.floats(width=32), max_size=8),
    bytes_contents=st.lists(st.binary(max_size=6), max_size=8),
)
TENSORS = st.builds(
    tensor_pb2.Tensor,
    name=st.text(max_size=4),
    dtype=DTYPE_VALUES,
    shape=DIMS,
    raw_data=st.binary(max_size=64),
    contents=st.one_of(st.none(), CONTENTS),
)


@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(tensors=st.lists(TENSORS, max_size=3))
def test_fuzzed_tensors_decode_or_fail_with_a_client_error(tensors):
    """Any tensors at all: decoded to arrays of the declared shape, or INVALID_ARGUMENT/RESOURCE_EXHAUSTED."""
    try:
        arrays = to_arrays(tensors, SMALL)
    except (InvalidArgument, ResourceExhausted):
        return
    for tensor in tensors:
        assert arrays[tensor.name].shape == tuple(tensor.shape)
