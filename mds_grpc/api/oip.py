"""Open Inference Protocol (V2) messages <-> numpy and core records.

Tensors decode straight to numpy through core.arrays, as mds.v1's do, so every check (limits,
dtype, shape against data) applies alike; V2 typed contents share mds.v1's field names.
"""

import re
import struct

import numpy as np

from mds.oip import grpc_service_pb2 as pb
from mds_grpc.api.tensors import CONTENTS_FIELD, fill_typed, from_typed
from mds_grpc.core import arrays, dtypes
from mds_grpc.core.aliases import check_alias_name
from mds_grpc.core.errors import InvalidArgument
from mds_grpc.core.limits import TensorLimits
from mds_grpc.core.records import ModelRecord, TensorSpec

V2_NAMES = {"STRING": "BYTES"}  # core dtype name -> V2 datatype, where they differ
# V2 datatypes, and (as ever accepted) the core names where they differ
BY_DATATYPE = {**dtypes.BY_NAME, **{v2: dtypes.BY_NAME[core] for core, v2 in V2_NAMES.items()}}
PLATFORM = "onnxruntime_onnx"


def parse_version(version: str) -> tuple[int, str]:
    """V2's model_version as (version, alias): "" for the latest, a version number, or an alias name."""
    if not version:
        return 0, ""
    if re.fullmatch(r"[0-9]{1,18}", version):  # ASCII digits only, and within int64
        return int(version), ""
    try:
        check_alias_name(version)
    except InvalidArgument as error:
        raise InvalidArgument(
            f"model_version must be empty (the latest), a version number or an alias: {error}"
        ) from None
    return 0, version


def _dtype(datatype: str, name: str) -> dtypes.DType:
    dtype = BY_DATATYPE.get(datatype)
    if dtype is None:
        raise InvalidArgument(f"input {name!r} has unknown datatype {datatype[:40]!r}")
    return dtype


def split_length_prefixed(data: bytes, name: str) -> list[bytes]:
    """BYTES elements in raw form: each a 4-byte little-endian length, then the bytes."""
    elements, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise InvalidArgument(f"raw BYTES input {name!r} ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise InvalidArgument(f"raw BYTES input {name!r} has an element longer than the data left")
        elements.append(data[offset : offset + length])
        offset += length
    return elements


def join_length_prefixed(elements) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _input_array(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, limits: TensorLimits, elements_so_far: int
) -> np.ndarray:
    name = tensor.name
    dtype = _dtype(tensor.datatype, name)
    shape = arrays.checked_shape(name, tensor.shape, limits)
    if raw is None:
        return from_typed(name, dtype, shape, tensor.contents, "raw_input_contents", limits, elements_so_far)
    if tensor.HasField("contents") and tensor.contents.ByteSize():
        raise InvalidArgument(f"input {name!r} has both contents and raw_input_contents")
    if dtype.name == "STRING":
        return arrays.from_strings(
            name, shape, split_length_prefixed(raw, name), "raw_input_contents", limits, elements_so_far
        )
    return arrays.from_raw(name, dtype, shape, raw, "raw_input_contents", limits, elements_so_far)


def input_arrays(request: pb.ModelInferRequest, limits: TensorLimits = TensorLimits()) -> dict[str, np.ndarray]:
    """Decode a request's inputs by name; a name given twice is INVALID_ARGUMENT; `limits` hold for them all."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    limits.check_inputs(len(request.inputs))
    decoded: dict[str, np.ndarray] = {}
    elements = 0
    for i, tensor in enumerate(request.inputs):
        if tensor.name in decoded:
            raise InvalidArgument(f"input {tensor.name!r} is given twice")
        decoded[tensor.name] = _input_array(tensor, raw[i] if raw else None, limits, elements)
        elements += decoded[tensor.name].size
    return decoded


def infer_response(
    request: pb.ModelInferRequest, model: str, version: int, outputs: list[tuple[str, np.ndarray]]
) -> pb.ModelInferResponse:
    """Outputs raw when the inputs were (or when FP16/BF16 leave no other choice), typed otherwise."""
    found = [(name, array, dtypes.of_output(name, array)) for name, array in outputs]
    raw = bool(request.raw_input_contents) or any(dtype.name not in CONTENTS_FIELD for _, _, dtype in found)
    response = pb.ModelInferResponse(model_name=model, model_version=str(version), id=request.id)
    for name, array, dtype in found:
        output = response.outputs.add(name=name, datatype=V2_NAMES.get(dtype.name, dtype.name), shape=array.shape)
        if not raw:
            fill_typed(output.contents, dtype, array)
        elif dtype.name == "STRING":
            response.raw_output_contents.append(join_length_prefixed(arrays.string_elements(array)))
        else:
            response.raw_output_contents.append(arrays.raw_bytes(array, dtype))
    return response


def tensor_metadata(specs: tuple[TensorSpec, ...]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    """The tensors among `specs`: V2 has no way to describe sequences or maps."""
    return [
        pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=V2_NAMES.get(s.dtype, s.dtype), shape=s.shape)
        for s in specs
        if s.dtype
    ]


def model_metadata(record: ModelRecord, versions: list[int]) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=record.name,
        versions=[str(v) for v in versions],
        platform=PLATFORM,
        inputs=tensor_metadata(record.inputs),
        outputs=tensor_metadata(record.outputs),
    )
