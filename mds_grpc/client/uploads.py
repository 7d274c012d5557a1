"""Request streams for uploads: a model with its external-data side files, a job's input in chunks of rows."""

import hashlib
import itertools
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from mds.v1 import job_service_pb2, model_service_pb2, tensor_pb2
from mds_grpc.api.tensors import from_array, to_wire_dtype
from mds_grpc.core import dtypes

CHUNK_BYTES = 1 << 20
JOB_MESSAGE_BYTES = 16 << 20  # rows per job-input message, roughly

Progress = Callable[[int, int], object]  # (bytes sent, bytes in all)
Source = Path | bytes  # a file, or the content itself


def side_files(model: Path) -> list[tuple[str, Path]]:
    """The external-data files a model references: (location relative to its folder, path)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    graph = onnx.load(str(model), load_external_data=False)
    locations = {ExternalDataInfo(t).location for t in _get_all_tensors(graph) if uses_external_data(t)}
    return [(location, model.parent / location) for location in sorted(locations)]


def size_of(source: Source) -> int:
    return len(source) if isinstance(source, bytes) else source.stat().st_size


def chunks(source: Source) -> Iterator[bytes]:
    if isinstance(source, bytes):
        yield from (source[start : start + CHUNK_BYTES] for start in range(0, len(source), CHUNK_BYTES))
        return
    with open(source, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk


class ModelUpload:
    """An .onnx model (a path, or its bytes) and the side files beside it, sent as UploadModel requests."""

    def __init__(self, model: str | os.PathLike | bytes):
        self.main: Source = model if isinstance(model, bytes) else Path(model)
        self.side = [] if isinstance(self.main, bytes) else side_files(self.main)
        self.digest = hashlib.sha256()  # of the main file, as sent

    def header(self, **fields) -> model_service_pb2.ModelHeader:
        files = [model_service_pb2.ModelFile(path=name, size_bytes=size_of(path)) for name, path in self.side]
        return model_service_pb2.ModelHeader(size_bytes=size_of(self.main), external_files=files, **fields)

    def requests(
        self, header: model_service_pb2.ModelHeader, progress: Progress | None
    ) -> Iterator[model_service_pb2.UploadModelRequest]:
        """The header, the main file's chunks, then each side file's; `progress(sent, total)` after each chunk."""
        total = header.size_bytes + sum(file.size_bytes for file in header.external_files)
        sent = 0
        if progress is not None:
            progress(sent, total)
        yield model_service_pb2.UploadModelRequest(header=header)
        for name, source in [("", self.main), *self.side]:
            for chunk in chunks(source):
                sent += len(chunk)
                if progress is not None:
                    progress(sent, total)
                if name:
                    yield model_service_pb2.UploadModelRequest(
                        file_chunk=model_service_pb2.FileChunk(path=name, data=chunk)
                    )
                else:
                    self.digest.update(chunk)
                    yield model_service_pb2.UploadModelRequest(chunk=chunk)


def job_input_requests(
    arrays: Mapping[str, np.ndarray], chunk_rows: int = 0
) -> Iterator[job_service_pb2.UploadJobInputRequest]:
    """The header, then every input's next `chunk_rows` rows per message (default: ~16 MiB messages).
    Rows are read as they are sent, so memory-mapped arrays stay on disk."""
    if not arrays:
        raise ValueError("a job needs at least one input")
    specs = [
        tensor_pb2.TensorSpec(name=name, dtype=to_wire_dtype(dtype_name(name, a)), shape=a.shape)
        for name, a in arrays.items()
    ]
    rows = next(iter(arrays.values())).shape[0]
    row_bytes = sum(a[:1].nbytes for a in arrays.values()) or 1
    chunk_rows = chunk_rows or max(1, JOB_MESSAGE_BYTES // row_bytes)
    header = job_service_pb2.UploadJobInputRequest(header=job_service_pb2.JobInputHeader(inputs=specs))
    chunks = (
        job_service_pb2.UploadJobInputRequest(
            chunk=job_service_pb2.JobInputChunk(
                inputs=[
                    from_array(name, np.asarray(a[start : start + chunk_rows]), raw=True) for name, a in arrays.items()
                ]
            )
        )
        for start in range(0, rows, chunk_rows)
    )
    return itertools.chain([header], chunks)


def dtype_name(name: str, array: np.ndarray) -> str:
    dtype = dtypes.of_array(array)
    if dtype is None:
        raise TypeError(f"input {name!r} has unsupported dtype {array.dtype}")
    return dtype.name
