"""Bulk jobs: inputs stored as raw columns, jobs created at once and queued, progress and results."""

import asyncio
import dataclasses
import hashlib
import math
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import BinaryIO, cast

import numpy as np

from mds_grpc.core import dtypes, result_files
from mds_grpc.core.aliases import Aliases
from mds_grpc.core.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from mds_grpc.core.garbage import store_and_record
from mds_grpc.core.inference import check_inputs, select_outputs
from mds_grpc.core.job_records import JobInputRecord, JobOutput, JobRecord, JobResult, JobState, JobTensor
from mds_grpc.core.limits import JobLimits
from mds_grpc.core.pages import decode_token, encode_token, page_limit
from mds_grpc.core.records import ModelRecord, utc_now
from mds_grpc.core.registry import ModelRegistry
from mds_grpc.core.stores import BlobUpload, Storage
from mds_grpc.core.to_the_end import to_the_end

STREAMED_COLUMNS = 2  # columns of one input streamed to the blob store at once; more go through local files


@dataclasses.dataclass(frozen=True)
class ColumnSpec:
    """A job input as declared before its rows arrive: full shape, rows first."""

    name: str
    dtype: str
    shape: tuple[int, ...]


class _InputWriter:
    """Writes the rows of every column, hashed as they come, to a blob upload of its own while they arrive
    (STREAMED_COLUMNS at a time, where the blob store takes streams) or else to a raw file: whole chunks of
    rows checked against the declared columns (write), or each column's raw bytes, one column after another
    (append)."""

    def __init__(self, folder: Path, limits: JobLimits, open_remote: Callable[[], BlobUpload | None] = lambda: None):
        self.folder = folder
        self.limits = limits
        self.open_remote = open_remote
        self.specs: dict[str, ColumnSpec] = {}
        self.paths: dict[str, Path] = {}
        self.files: dict[str, BinaryIO] = {}  # open: every column for `write`, the current one for `append`
        self.remote: dict[str, BlobUpload] = {}  # columns streamed to the blob store (no local file)
        self.streaming: set[str] = set()  # those still taking bytes
        self.hashers: dict[str, hashlib._Hash] = {}
        self.sizes: dict[str, int] = {}  # bytes written per column
        self.total = 0  # bytes declared, all columns together
        self.rows = -1
        self.written = 0  # rows `write` has taken
        self.current = ""  # the column `append` writes to

    def add(self, spec: ColumnSpec) -> None:
        if spec.name in self.specs:
            raise InvalidArgument(f"input names must be unique; {spec.name!r} comes twice")
        self.limits.tensors.check_inputs(len(self.specs) + 1)
        self.limits.tensors.check_rank(spec.name, spec.shape)
        if spec.dtype == "STRING":
            raise InvalidArgument(f"input {spec.name!r} is STRING; jobs take numeric and boolean tensors only")
        if not spec.shape or any(d < 0 for d in spec.shape):
            raise InvalidArgument(f"input {spec.name!r} needs a full shape with rows first, got {list(spec.shape)}")
        if self.rows not in (-1, spec.shape[0]):
            raise InvalidArgument(
                f"every input needs the same number of rows: {spec.name!r} has {spec.shape[0]}, others {self.rows}"
            )
        size = self.total + self._bytes(spec)
        if size > self.limits.max_input_bytes:
            raise ResourceExhausted(
                f"job input of {size} bytes exceeds the server's limit of {self.limits.max_input_bytes} bytes"
            )
        self.rows, self.total = spec.shape[0], size
        remote = self.open_remote() if len(self.streaming) < STREAMED_COLUMNS else None
        if remote is not None:
            self.remote[spec.name] = remote
            self.streaming.add(spec.name)
        else:
            self.paths[spec.name] = self.folder / f"column-{len(self.specs)}"
            self.files[spec.name] = open(self.paths[spec.name], "wb")
        self.specs[spec.name] = spec
        self.hashers[spec.name] = hashlib.sha256()
        self.sizes[spec.name] = 0

    @staticmethod
    def _bytes(spec: ColumnSpec) -> int:
        return math.prod(spec.shape) * dtypes.BY_NAME[spec.dtype].numpy.itemsize

    def write(self, chunk: dict[str, np.ndarray]) -> None:
        if set(chunk) != set(self.specs):
            raise InvalidArgument(f"each chunk needs exactly the inputs {sorted(self.specs)}, got {sorted(chunk)}")
        counts = {array.shape[0] if array.ndim else -1 for array in chunk.values()}
        if len(counts) != 1 or -1 in counts:
            raise InvalidArgument("every tensor of a chunk needs the same number of rows, along dimension 0")
        count = counts.pop()
        if self.written + count > self.rows:
            raise InvalidArgument(f"more rows than the {self.rows} the header declared")
        for name, array in chunk.items():
            spec = self.specs[name]
            dtype = dtypes.of_array(array)
            if dtype is None or dtype.name != spec.dtype or array.shape[1:] != spec.shape[1:]:
                raise InvalidArgument(
                    f"chunk tensor {name!r} must be {spec.dtype} with rows of shape {list(spec.shape[1:])}, "
                    f"got {dtype.name if dtype else array.dtype} {list(array.shape)}"
                )
            little_endian = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
            self._put(name, little_endian.reshape(-1).view(np.uint8).data)  # no copy
        self.written += count

    def append(self, spec: ColumnSpec, data: bytes) -> None:
        """The next raw bytes (little-endian, C order) of column `spec`, which starts when first seen."""
        if spec.name != self.current:
            if self.current:
                self._end(self.current)
            self.add(spec)
            self.current = spec.name
        if self.sizes[spec.name] + len(data) > self._bytes(spec):
            raise InvalidArgument(f"input {spec.name!r} has more data than its shape {list(spec.shape)} holds")
        self._put(spec.name, data)

    def _put(self, name: str, data: bytes | memoryview) -> None:
        if not len(data):
            return
        self.hashers[name].update(data)
        if name in self.remote:
            self.remote[name].write(cast(bytes, data))  # any bytes-like object
        else:
            self.files[name].write(data)
        self.sizes[name] += len(data)

    def _end(self, name: str) -> None:
        """No more bytes for column `name`."""
        if name in self.files:
            self.files.pop(name).close()
        if name in self.streaming:
            self.streaming.remove(name)
            self.remote[name].close()  # its part buffers go now, not at the commit

    def finish(self) -> list[tuple[ColumnSpec, str]]:
        """The columns with their sha256, once all their bytes are written."""
        for name in list(self.streaming):
            self._end(name)
        self.close()
        if not self.specs:
            raise InvalidArgument("a job input needs at least one tensor")
        for name, spec in self.specs.items():
            if self.sizes[name] != self._bytes(spec):
                row = self._bytes(spec) // max(1, self.rows)
                got = f"{self.sizes[name] // row} rows" if row else f"{self.sizes[name]} bytes"
                raise InvalidArgument(f"received {got}, the header declared {self.rows} (input {name!r})")
        return [(spec, self.hashers[name].hexdigest()) for name, spec in self.specs.items()]

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()

    def discard(self) -> None:
        """Close the files and abandon the uploads that were not committed."""
        self.close()
        for upload in self.remote.values():
            upload.abort()  # a no-op once committed


def _as_rows(column: ColumnSpec) -> np.ndarray:
    """A stand-in array of the column's dtype and a batch's shape, for signature checks (no allocation)."""
    return np.broadcast_to(np.zeros((), dtypes.BY_NAME[column.dtype].numpy), (1, *column.shape[1:]))


def _bytes_of(array: np.ndarray) -> int:
    """Bytes on the wire, about: STRING elements count their UTF-8 length."""
    if array.dtype == object:
        return sum(len(v.encode() if isinstance(v, str) else v) for v in array.ravel())
    return array.nbytes


@dataclasses.dataclass(frozen=True)
class OutputRows:
    """One output of a job as a single array: rows of `row_shape` and `dtype`, streamed in chunks."""

    dtype: np.dtype
    row_shape: tuple[int, ...]
    chunks: AsyncIterator[np.ndarray]


def _job_outputs(record: ModelRecord, names: Sequence[str]) -> tuple[JobOutput, ...]:
    """The outputs `names` of a model version as a job records them, in that order."""
    specs = {spec.name: spec for spec in record.outputs}
    return tuple(JobOutput(name, specs[name].dtype or "", specs[name].shape[1:]) for name in names)


def _varying(name: str) -> str:
    return f"output {name!r} has rows of varying shape, which no single array holds; use GetJobResults"


async def _shaped(
    name: str, row_shape: tuple[int, ...], first: np.ndarray | None, rest: AsyncIterator[np.ndarray]
) -> AsyncIterator[np.ndarray]:
    """`first` (if any) then `rest`, each checked to have rows of `row_shape`."""
    if first is not None:
        yield first
    async for batch in rest:
        if batch.shape[1:] != row_shape:
            raise FailedPrecondition(_varying(name))
        yield batch


class JobManager:
    def __init__(
        self,
        storage: Storage,
        registry: ModelRegistry,
        tmp_dir: Path,
        enqueue: Callable[[str], object],
        limits: JobLimits,
        aliases: Aliases,
        poll_seconds: float = 0.2,
    ):
        self.storage = storage
        self.registry = registry
        self.aliases = aliases
        self.tmp_dir = Path(tmp_dir)
        self.enqueue = enqueue
        self.limits = limits
        self.poll_seconds = poll_seconds

    async def upload_input(
        self, specs: Sequence[ColumnSpec], chunks: AsyncIterable[dict[str, np.ndarray]]
    ) -> JobInputRecord:
        """Store a job input declared up front and streamed as chunks of rows; nothing stays behind on failure."""

        async def fill(writer: _InputWriter) -> None:
            if not specs:
                raise InvalidArgument("a job input needs at least one tensor")
            for spec in specs:
                writer.add(spec)
            async for chunk in chunks:
                await to_the_end(asyncio.to_thread(writer.write, chunk))

        return await self._store_input(fill)

    async def upload_columns(self, parts: AsyncIterable[tuple[ColumnSpec, bytes]]) -> JobInputRecord:
        """Store a job input streamed column after column as (column, next raw little-endian C-order bytes)."""

        async def fill(writer: _InputWriter) -> None:
            async for spec, data in parts:
                await to_the_end(asyncio.to_thread(writer.append, spec, data))

        return await self._store_input(fill)

    async def _store_input(self, fill: Callable[["_InputWriter"], Awaitable[None]]) -> JobInputRecord:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="job-input-", dir=self.tmp_dir))
        writer = _InputWriter(folder, self.limits, self.storage.blobs.open_upload)
        try:
            await fill(writer)
            columns = await to_the_end(asyncio.to_thread(writer.finish))
            record = JobInputRecord(
                uuid.uuid4().hex,
                writer.rows,
                tuple(JobTensor(spec.name, spec.dtype, spec.shape[1:], sha256) for spec, sha256 in columns),
                utc_now(),
            )
            writes = [
                (
                    sha256,
                    partial(writer.remote[spec.name].commit, sha256)
                    if spec.name in writer.remote
                    else partial(self.storage.blobs.put_file, writer.paths[spec.name], sha256),
                )
                for spec, sha256 in columns
            ]
            await to_the_end(
                asyncio.to_thread(
                    store_and_record,
                    self.storage.metadata,
                    self.storage.blobs,
                    writes,
                    partial(self.storage.jobs.create_input, record),
                    jobs=self.storage.jobs,
                )
            )
            return record
        finally:  # the writes above have ended: a cancellation waits for the thread it interrupts
            await to_the_end(asyncio.to_thread(writer.discard))
            await to_the_end(asyncio.to_thread(shutil.rmtree, folder, True))

    async def create(
        self,
        model: str,
        version: int,
        inline: dict[str, np.ndarray] | None,
        input_id: str,
        output_names: Sequence[str],
        batch_rows: int,
        alias: str = "",
    ) -> JobRecord:
        """Validate, store and enqueue a job; returns it QUEUED without waiting for any work. Through an alias,
        the job keeps the alias's main version (never its canary) whatever the alias does next."""
        if bool(inline) == bool(input_id):
            raise InvalidArgument("give the job's rows either inline in `inputs` or as `input_id`, not both or neither")
        self.limits.check_batch_rows(batch_rows)
        version = await self.aliases.version_for(model, version, alias, canary=False)
        record = await self.registry.get(model, version)
        job_input: JobInputRecord | None
        if inline:
            specs = [
                ColumnSpec(name, getattr(dtypes.of_array(a), "name", str(a.dtype)), a.shape)
                for name, a in inline.items()
            ]
            self._check_fits(record, specs)

            async def one_chunk():
                yield inline

            job_input = await self.upload_input(specs, one_chunk())
        else:
            job_input = await asyncio.to_thread(self.storage.jobs.get_input, input_id)
            if job_input is None:
                raise NotFound(f"job input {input_id!r} does not exist")
            self._check_fits(
                record, [ColumnSpec(t.name, t.dtype, (job_input.rows, *t.row_shape)) for t in job_input.tensors]
            )
        names = select_outputs(record, output_names)
        not_tensors = [s.name for s in record.outputs if s.name in names and s.dtype is None]
        if not_tensors:
            raise InvalidArgument(f"output {not_tensors[0]!r} is not a tensor; list the tensor outputs in output_names")
        now = utc_now()
        job = JobRecord(
            id=uuid.uuid4().hex,
            model=record.name,
            version=record.version,
            state=JobState.QUEUED,
            input=job_input,
            output_names=tuple(names),
            batch_rows=batch_rows or self.limits.default_batch_rows,
            created_at=now,
            updated_at=now,
            outputs=_job_outputs(record, names),
        )
        await asyncio.to_thread(self.storage.jobs.create, job)
        try:
            await asyncio.to_thread(self.enqueue, job.id)
        except Exception as error:  # the broker is down: the job cannot run, say so on the job too
            message = f"could not queue the job: {error}"
            await asyncio.to_thread(self.storage.jobs.transition, job.id, {JobState.QUEUED}, JobState.FAILED, message)
            raise Unavailable(message) from None
        return job

    @staticmethod
    def _check_fits(record, columns: Sequence[ColumnSpec]) -> None:
        for spec in record.inputs:
            if not spec.shape or spec.shape[0] >= 0:
                raise InvalidArgument(
                    f"input {spec.name!r} of model {record.name!r} has no symbolic first dimension to batch rows along"
                )
        check_inputs(record, {c.name: _as_rows(c) for c in columns})

    async def get(self, job_id: str) -> JobRecord:
        job = await asyncio.to_thread(self.storage.jobs.get, job_id)
        if job is None:
            raise NotFound(f"job {job_id!r} does not exist")
        return job

    async def list_page(
        self, state: JobState | None, model: str, page_size: int, page_token: str
    ) -> tuple[list[JobRecord], str]:
        limit = page_limit(page_size)
        after = decode_token(page_token, (datetime.fromisoformat, str))
        jobs = await asyncio.to_thread(self.storage.jobs.list_page, state, model or None, after, limit + 1)
        if len(jobs) > limit:
            last = jobs[limit - 1]
            return jobs[:limit], encode_token([last.created_at.isoformat(), last.id])
        return jobs, ""

    async def cancel(self, job_id: str) -> JobRecord:
        job = await asyncio.to_thread(
            self.storage.jobs.transition, job_id, {JobState.QUEUED, JobState.RUNNING}, JobState.CANCELLED
        )
        if job is None:
            current = await self.get(job_id)
            raise FailedPrecondition(
                f"job {job_id!r} is {current.state.value}; only queued or running jobs can be cancelled"
            )
        return job

    async def watch(self, job_id: str) -> AsyncIterator[JobRecord]:
        """The job, then each change of its state or progress, until it is terminal."""
        seen = None
        while True:
            job = await self.get(job_id)
            if (job.state, job.rows_done) != seen:
                seen = (job.state, job.rows_done)
                yield job
            if job.state.terminal:
                return
            await asyncio.sleep(self.poll_seconds)

    async def results(self, job: JobRecord) -> AsyncIterator[tuple[int, int, dict[str, np.ndarray]]]:
        """(row offset, rows, outputs) in row order; a stored batch bigger than a message comes in slices."""
        if job.state != JobState.SUCCEEDED:
            raise FailedPrecondition(f"job {job.id!r} is {job.state.value}; results are readable once it has SUCCEEDED")
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

        def read(i: int) -> asyncio.Future | None:
            """Result i, read on a thread while the one before it is sent."""
            if i == len(job.results):
                return None
            future = asyncio.ensure_future(asyncio.to_thread(self._read_result, job.results[i], job.output_names))
            future.add_done_callback(lambda f: f.cancelled() or f.exception())  # a result never sent is no error
            return future

        reading = read(0)
        try:
            for i, result in enumerate(job.results):
                assert reading is not None
                arrays = await reading
                reading = read(i + 1)
                row_bytes = max(1, sum(_bytes_of(a) for a in arrays.values()) // max(1, result.rows))
                step = max(1, self.limits.result_message_bytes // row_bytes)
                for start in range(0, result.rows, step):
                    rows = min(step, result.rows - start)
                    yield result.offset + start, rows, {name: a[start : start + rows] for name, a in arrays.items()}
                del arrays
        finally:
            if reading is not None:
                reading.cancel()

    async def output_rows(self, job: JobRecord, name: str) -> OutputRows:
        """One output of a SUCCEEDED job as a single array: its dtype, its row shape and its rows in chunks.
        Rows of varying shape (a symbolic non-batch dimension) are FAILED_PRECONDITION, before any chunk
        when the job's results recorded their shapes, else at the first chunk that differs."""
        if name not in job.output_names:
            raise InvalidArgument(f"name one of the job's outputs {list(job.output_names)} with output=NAME")
        index = job.output_names.index(name)
        if len({result.row_shapes[index] for result in job.results if result.row_shapes}) > 1:
            raise FailedPrecondition(_varying(name))
        batches = (arrays[name] async for _, _, arrays in self.results(job))
        first = await anext(batches, None)
        if first is None:
            output = await self._declared_output(job, name)
            dtype, row_shape = dtypes.BY_NAME[output.dtype].numpy, tuple(max(d, 0) for d in output.row_shape)
        else:
            dtype, row_shape = first.dtype, first.shape[1:]
        return OutputRows(dtype, row_shape, _shaped(name, row_shape, first, batches))

    async def _declared_output(self, job: JobRecord, name: str) -> JobOutput:
        """The output as the job recorded it, or (a job stored before outputs were recorded) as its model says."""
        outputs = job.outputs or _job_outputs(await self.registry.get(job.model, job.version), job.output_names)
        return outputs[job.output_names.index(name)]

    def _read_result(self, result: JobResult, names: Sequence[str]) -> dict[str, np.ndarray]:
        with tempfile.TemporaryDirectory(dir=self.tmp_dir) as folder:
            path = Path(folder) / "result.npz"
            self.storage.blobs.fetch_to(result.sha256, path)
            arrays = result_files.load(path, len(names))
        return dict(zip(names, arrays, strict=True))
