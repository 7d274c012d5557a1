"""mds.v1.HttpUploadService and HttpDownloadService: HTTP bodies (plain or multipart) converted into the
uploads of the model registry and the job manager, and job outputs as .npy files."""

from collections.abc import AsyncIterable, AsyncIterator

from google.api import httpbody_pb2
from google.protobuf import json_format

from mds.v1 import http_files_pb2, http_files_pb2_grpc
from mds.v1 import model_service_pb2 as model_pb
from mds_grpc.api.auth import check_model
from mds_grpc.api.call_record import annotate
from mds_grpc.api.form_data import body_chunks, boundary_of, form_pieces
from mds_grpc.api.jobs import input_to_wire
from mds_grpc.api.models import header_from_wire, model_to_wire
from mds_grpc.api.npy_files import NpyStream, npy_header, row_pieces
from mds_grpc.core.auth import ADMIN
from mds_grpc.core.errors import InvalidArgument
from mds_grpc.core.jobs import ColumnSpec, JobManager
from mds_grpc.core.records import MAIN_FILE
from mds_grpc.core.registry import ModelRegistry
from mds_grpc.core.uploads import UploadHeader

MAIN_PART = "model"  # the multipart part holding the .onnx file
HEADER_PART = "header"  # the multipart part holding a ModelHeader in JSON
MAX_HEADER_BYTES = 1 << 20


def _header_part(text: bytes) -> UploadHeader:
    try:
        return header_from_wire(json_format.Parse(text, model_pb.ModelHeader()))
    except (json_format.ParseError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"the `header` part is not a ModelHeader in JSON: {error}") from None


def _check_new(name: str, names: set[str]) -> None:
    """A part's name, unless an earlier part had it."""
    if name in names:
        raise InvalidArgument(f"two multipart parts are named {name!r}")
    names.add(name)


async def _model_parts(
    boundary: bytes, chunks: AsyncIterable[bytes], has_query_header: bool
) -> AsyncIterator[tuple[str, bytes] | UploadHeader]:
    """A multipart model upload as the registry's parts: (file path, bytes), and the header part when it ends."""
    names: set[str] = set()
    current, header = -1, b""
    async for piece in form_pieces(boundary, chunks):
        if piece.part != current:
            _check_new(piece.name, names)
            current = piece.part
        if piece.name != HEADER_PART:
            yield (MAIN_FILE if piece.name == MAIN_PART else piece.name), piece.data
            continue
        if has_query_header:
            raise InvalidArgument("give the header either as the `header` part or as query parameters, not both")
        header += piece.data
        if len(header) > MAX_HEADER_BYTES:
            raise InvalidArgument(f"the `header` part exceeds {MAX_HEADER_BYTES} bytes")
        if piece.last:
            yield _header_part(header)


async def _main_file(chunks: AsyncIterable[bytes]) -> AsyncIterator[tuple[str, bytes]]:
    async for data in chunks:
        yield MAIN_FILE, data


async def _npy_file(name: str, chunks: AsyncIterable[bytes]) -> AsyncIterator[tuple[ColumnSpec, bytes]]:
    stream = NpyStream(name)
    async for data in chunks:
        for column in stream.feed(data):
            yield column
    stream.close()


async def _npy_parts(boundary: bytes, chunks: AsyncIterable[bytes]) -> AsyncIterator[tuple[ColumnSpec, bytes]]:
    """One .npy file per part, named by its input."""
    stream: NpyStream | None = None
    names: set[str] = set()
    async for piece in form_pieces(boundary, chunks):
        if stream is None:
            _check_new(piece.name, names)
            stream = NpyStream(piece.name)
        for column in stream.feed(piece.data):
            yield column
        if piece.last:
            stream.close()
            stream = None


class HttpUploadServicer(http_files_pb2_grpc.HttpUploadServiceServicer):
    def __init__(self, registry: ModelRegistry, jobs: JobManager):
        self.registry = registry
        self.jobs = jobs

    async def UploadModelBody(self, request_iterator, context):
        first = await anext(request_iterator, None) or http_files_pb2.UploadModelBodyRequest()
        annotate(model=first.name)
        check_model(first.name, ADMIN)
        header = UploadHeader(first.name, first.description, sha256=first.sha256.lower(), open_files=True)
        chunks = body_chunks(first.body.data, request_iterator)
        boundary = boundary_of(first.body.content_type)
        parts = (
            _main_file(chunks)
            if boundary is None
            else _model_parts(boundary, chunks, bool(first.description or first.sha256))
        )
        record = await self.registry.upload(header, parts)
        annotate(version=record.version)
        return model_to_wire(record, runs_on=self.registry.runs_on(record))

    async def UploadJobInputBody(self, request_iterator, context):
        first = await anext(request_iterator, None) or http_files_pb2.UploadJobInputBodyRequest()
        chunks = body_chunks(first.body.data, request_iterator)
        boundary = boundary_of(first.body.content_type)
        if boundary is not None and first.input:
            raise InvalidArgument("a multipart body names its inputs by its parts: drop the `input` query parameter")
        if boundary is None and not first.input:
            raise InvalidArgument("name the input this .npy body holds with the query parameter `input`")
        parts = _npy_file(first.input, chunks) if boundary is None else _npy_parts(boundary, chunks)
        return input_to_wire(await self.jobs.upload_columns(parts))


class HttpDownloadServicer(http_files_pb2_grpc.HttpDownloadServiceServicer):
    def __init__(self, jobs: JobManager):
        self.jobs = jobs

    async def DownloadJobOutput(self, request, context):
        if request.format != "npy":
            raise InvalidArgument(f"format {request.format!r} is not supported; use format=npy")
        job = await self.jobs.get(request.id)
        check_model(job.model)
        output = await self.jobs.output_rows(job, request.output)
        header = npy_header(output.dtype, (job.rows_total, *output.row_shape))
        yield httpbody_pb2.HttpBody(content_type="application/octet-stream", data=header)
        async for rows in output.chunks:
            for data in row_pieces(rows):
                yield httpbody_pb2.HttpBody(data=data)
