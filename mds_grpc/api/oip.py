"""Open Inference Protocol (V2) messages <-> numpy and core records.

V2 tensor contents share mds.v1's field numbers and types, so typed contents cross over
by re-parsing and every check of `tensors.to_array` applies to V2 requests too.
"""

import re
import struct

import numpy as np

from mds.oip import grpc_service_pb2 as pb
from mds.v1 import tensor_pb2
from mds_grpc.api.tensors import CONTENTS_FIELD, from_array, to_arrays
from mds_grpc.core import dtypes
from mds_grpc.core.errors import InvalidArgument
from mds_grpc.core.limits import TensorLimits
from mds_grpc.core.records import ModelRecord, TensorSpec

V2_NAMES = {"STRING": "BYTES"}  # core dtype name -> V2 datatype, where they differ
CORE_NAMES = {v2: core for core, v2 in V2_NAMES.items()}
PLATFORM = "onnxruntime_onnx"


def parse_version(version: str) -> int:
    if not version:
        return 0
    if not re.fullmatch(r"[0-9]{1,18}", version):  # ASCII digits only, and within int64
        raise InvalidArgument(f"model_version must be a version number or empty for the latest, got {version[:40]!r}")
    return int(version)


def _core_dtype(datatype: str, name: str) -> int:
    try:
        return tensor_pb2.DataType.Value("DATA_TYPE_" + CORE_NAMES.get(datatype, datatype))
    except ValueError:
        raise InvalidArgument(f"input {name!r} has unknown datatype {datatype!r}") from None


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
        elements.append(data[offset:offset + length])
        offset += length
    return elements


def join_length_prefixed(elements) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _as_mds_tensor(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> tensor_pb2.Tensor:
    converted = tensor_pb2.Tensor(name=tensor.name, dtype=_core_dtype(tensor.datatype, tensor.name),
                                  shape=tensor.shape,
                                  contents=tensor_pb2.TensorContents.FromString(tensor.contents.SerializeToString()))
    if raw is not None:
        if converted.contents.ByteSize():
            raise InvalidArgument(f"input {tensor.name!r} has both contents and raw_input_contents")
        if converted.dtype == tensor_pb2.DATA_TYPE_STRING:
            converted.contents.bytes_contents.extend(split_length_prefixed(raw, tensor.name))
        else:
            converted.raw_data = raw
    return converted


def input_arrays(request: pb.ModelInferRequest, limits: TensorLimits = TensorLimits()) -> dict[str, np.ndarray]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    return to_arrays([_as_mds_tensor(tensor, raw[i] if raw else None) for i, tensor in enumerate(request.inputs)],
                     limits)


def infer_response(request: pb.ModelInferRequest, model: str, version: int,
                   outputs: list[tuple[str, np.ndarray]]) -> pb.ModelInferResponse:
    """Outputs raw when the inputs were (or when FP16/BF16 leave no other choice), typed otherwise."""
    raw = bool(request.raw_input_contents) or any(
        dtypes.of_array(array).name not in CONTENTS_FIELD for _, array in outputs)
    response = pb.ModelInferResponse(model_name=model, model_version=str(version), id=request.id)
    for name, array in outputs:
        tensor = from_array(name, array, raw)
        datatype = dtypes.of_array(array).name
        output = response.outputs.add(name=name, datatype=V2_NAMES.get(datatype, datatype), shape=tensor.shape)
        if not raw:
            output.contents.ParseFromString(tensor.contents.SerializeToString())
        elif tensor.dtype == tensor_pb2.DATA_TYPE_STRING:
            response.raw_output_contents.append(join_length_prefixed(tensor.contents.bytes_contents))
        else:
            response.raw_output_contents.append(tensor.raw_data)
    return response


def tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    datatype = V2_NAMES.get(spec.dtype, spec.dtype)
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=datatype, shape=spec.shape)


def model_metadata(record: ModelRecord, versions: list[int]) -> pb.ModelMetadataResponse:
    """Tensor inputs and outputs only: V2 has no way to describe sequences or maps."""
    return pb.ModelMetadataResponse(
        name=record.name, versions=[str(v) for v in versions], platform=PLATFORM,
        inputs=[tensor_metadata(s) for s in record.inputs if s.dtype],
        outputs=[tensor_metadata(s) for s in record.outputs if s.dtype])

