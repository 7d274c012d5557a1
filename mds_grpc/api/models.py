"""mds.v1 model messages <-> core records and upload headers."""

from collections.abc import AsyncIterator, Iterable

from google.protobuf import json_format

from mds.v1 import model_service_pb2 as pb
from mds.v1 import tensor_pb2
from mds_grpc.api.tensors import to_wire_dtype
from mds_grpc.core.alias_records import AliasEvent, AliasRecord
from mds_grpc.core.errors import InvalidArgument
from mds_grpc.core.records import MAIN_FILE, BatchingPolicy, ModelRecord, Placement, StoredFile, TensorSpec
from mds_grpc.core.uploads import UploadHeader


def spec_to_wire(spec: TensorSpec) -> tensor_pb2.TensorSpec:
    return tensor_pb2.TensorSpec(
        name=spec.name,
        dtype=to_wire_dtype(spec.dtype),
        shape=spec.shape,
        onnx_type=spec.onnx_type,
        dim_names=spec.dim_names,
    )


def model_to_wire(record: ModelRecord, aliases: Iterable[str] = (), runs_on: Iterable[str] = ()) -> pb.Model:
    model = pb.Model(
        name=record.name,
        version=record.version,
        sha256=record.sha256,
        size_bytes=record.size_bytes,
        inputs=[spec_to_wire(s) for s in record.inputs],
        outputs=[spec_to_wire(s) for s in record.outputs],
        opsets=[pb.OperatorSet(domain=d, version=v) for d, v in record.opsets],
        producer_name=record.producer_name,
        producer_version=record.producer_version,
        ir_version=record.ir_version,
        description=record.description,
        labels=record.labels,
        files=[pb.ModelFile(path=f.path, size_bytes=f.size_bytes, sha256=f.sha256) for f in record.files],
        aliases=sorted(aliases),
        execution_providers=runs_on,
    )
    if record.batching.enabled:
        model.batching.max_batch_size = record.batching.max_batch_size
        model.batching.max_queue_delay_us = record.batching.max_queue_delay_us
    if record.placement != Placement():
        model.placement.CopyFrom(placement_to_wire(record.placement))
    model.created_at.FromDatetime(record.created_at)
    model.metadata.update(record.metadata)
    return model


def placement_to_wire(placement: Placement) -> pb.Placement:
    return pb.Placement(
        execution_providers=placement.providers,
        device_id=placement.device_id,
        tensorrt_fp16=placement.tensorrt_fp16,
        device_memory_bytes=placement.device_memory_bytes,
    )


def alias_to_wire(alias: AliasRecord) -> pb.Alias:
    wire = pb.Alias(
        model=alias.model,
        alias=alias.alias,
        version=alias.version,
        canary_version=alias.canary_version,
        canary_percent=alias.canary_percent,
    )
    if alias.updated_at is not None:
        wire.updated_at.FromDatetime(alias.updated_at)
    return wire


def alias_change_to_wire(event: AliasEvent) -> pb.AliasChange:
    change = pb.AliasChange(
        action=event.action,
        version=event.version,
        canary_version=event.canary_version,
        canary_percent=event.canary_percent,
        who=event.who,
    )
    change.at.FromDatetime(event.at)
    return change


def header_from_wire(header: pb.ModelHeader) -> UploadHeader:
    try:
        metadata = json_format.MessageToDict(header.metadata)
    except ValueError as error:  # NaN and infinities have no JSON form
        raise InvalidArgument(f"header.metadata must be JSON: {error}") from None
    return UploadHeader(
        name=header.name,
        description=header.description,
        labels=dict(header.labels),
        metadata=metadata,
        sha256=header.sha256.lower(),
        size_bytes=header.size_bytes,
        external_files=tuple(StoredFile(f.path, f.sha256.lower(), f.size_bytes) for f in header.external_files),
        batching=BatchingPolicy(header.batching.max_batch_size, header.batching.max_queue_delay_us),
        placement=Placement(
            tuple(name.lower() for name in header.placement.execution_providers),
            header.placement.device_id,
            header.placement.tensorrt_fp16,
            header.placement.device_memory_bytes,
        ),
    )


async def split_upload(requests: AsyncIterator[pb.UploadModelRequest]) -> tuple[UploadHeader, AsyncIterator]:
    """The header (which must come first) and an iterator of (file path, bytes) parts."""
    first = await anext(requests, None)
    if first is None or first.WhichOneof("payload") != "header":
        raise InvalidArgument("the first UploadModelRequest must carry the header")

    async def parts():
        async for request in requests:
            kind = request.WhichOneof("payload")
            if kind == "chunk":
                yield MAIN_FILE, request.chunk
            elif kind == "file_chunk":
                yield request.file_chunk.path, request.file_chunk.data
            elif kind == "header":
                raise InvalidArgument("only the first UploadModelRequest may carry a header")

    return header_from_wire(first.header), parts()
