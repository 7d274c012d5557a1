"""Running a bulk job: batches of rows through the model's session, each result recorded once.

Three threads share a job's work so that fetching, running and storing overlap: a reader fetches the input
in windows of whole batches (ranged reads of the stored columns) ahead of the batches that need them, the
job's own thread runs the batches, and a writer stores and records each result while the next batches run.
Each hands over through a queue that holds one item, so a job holds a few windows of input and a few
results in memory whatever its size, and a batch's outputs go once their result is stored.
"""

import contextlib
import logging
import math
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np

from mds_grpc.core import dtypes, result_files
from mds_grpc.core.errors import FailedPrecondition, Unavailable
from mds_grpc.core.garbage import store_and_record
from mds_grpc.core.job_changes import CHANGES, JobChanges
from mds_grpc.core.job_records import JobRecord, JobResult, JobState
from mds_grpc.core.model_cache import materialize
from mds_grpc.core.placement import Placer
from mds_grpc.core.records import MAIN_FILE
from mds_grpc.core.runtime import OnnxSession, RunFailed
from mds_grpc.core.stores import BlobStore, Storage
from mds_grpc.core.uploads import sha256_of

log = logging.getLogger("mds.jobs")
RESULT_BYTES = 16 << 20  # outputs stored in one result blob, at most about
# Input rows fetched by one ranged read per column, all columns together, about: the first window is one
# batch, so the first run starts soon; the later ones are bigger, as each GET costs MinIO some CPU of its
# own (a 256 MiB input read in windows of 1 MiB took it 1.6 s of CPU, of 8 MiB 0.5 s, of 16 MiB 0.4 s).
WINDOW_BYTES = 16 << 20

Window = tuple[int, int, dict[str, np.ndarray]]  # (first row, rows, column name: rows)


class JobRunner:
    """Runs one job to a terminal state; safe to run again (after a crash) or twice at once."""

    def __init__(
        self,
        storage: Storage,
        work_dir: Path,
        intra_op_threads: int = 0,
        commit_seconds: float = 1.0,
        changes: JobChanges = CHANGES,
        placer: Placer | None = None,
    ):
        self.storage = storage
        self.placer = placer or Placer()  # a job runs where its version's predictions run
        self.work_dir = Path(work_dir)
        self.intra_op_threads = intra_op_threads
        # Batches run until this much time (or RESULT_BYTES of outputs) has passed, then their outputs
        # are stored and recorded together: each record costs a blob write and a conditional update.
        self.commit_seconds = commit_seconds
        self.changes = changes

    def run(self, job_id: str) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"job-{job_id}-", dir=self.work_dir))
        try:
            self._run(job_id, folder)
        except Unavailable:
            raise  # a backend is down: the queue retries the job later, from where it got to
        except _JobFailed as error:
            self._fail(job_id, str(error))
        except Exception as error:
            log.exception("job failed", extra={"job": job_id})
            self._fail(job_id, f"internal error: {error}")
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _fail(self, job_id: str, reason: str) -> None:
        self.storage.jobs.transition(job_id, {JobState.QUEUED, JobState.RUNNING}, JobState.FAILED, reason)
        self.changes.notify(job_id)

    def _run(self, job_id: str, folder: Path) -> None:
        jobs = self.storage.jobs
        job = jobs.get(job_id)
        if job is None or job.state.terminal:
            return
        if job.state == JobState.QUEUED:
            job = jobs.transition(job_id, {JobState.QUEUED}, JobState.RUNNING) or jobs.get(job_id)
            self.changes.notify(job_id)
        if job is not None and job.state == JobState.RUNNING:
            self._run_batches(job, folder)

    def _run_batches(self, job: JobRecord, folder: Path) -> None:
        record = self.storage.metadata.get(job.model, job.version)
        if record is None:
            raise _JobFailed(f"model {job.model!r} version {job.version} was deleted")
        try:
            target = self.placer.target(record.name, record.version, record.placement)
            path = materialize(self.storage.blobs, record, folder / "model") / MAIN_FILE
            session = OnnxSession(path, self.intra_op_threads, target=target, arena=True)
        except FailedPrecondition as error:
            raise _JobFailed(str(error)) from None
        while job.rows_done < job.rows_total:
            recorded, failure = self._run_rows(job, session, folder)
            if recorded is None or recorded.state != JobState.RUNNING:
                return
            if failure is not None:
                raise failure
            job = recorded  # on from there: the end, or rows another worker got to first
        self.storage.jobs.transition(job.id, {JobState.RUNNING}, JobState.SUCCEEDED)
        self.changes.notify(job.id)
        log.info("job succeeded", extra={"job": job.id, "rows": job.rows_total})

    def _run_rows(
        self, job: JobRecord, session: OnnxSession, folder: Path
    ) -> tuple[JobRecord | None, "_JobFailed | None"]:
        """Run the rows from job.rows_done on until the end, a batch that fails, or a record that does not
        extend this run's own (the job cancelled, or another worker ahead); the job as last recorded, and the
        failure that stopped the run if one did."""
        with contextlib.ExitStack() as stack:  # closes the writer, then the reader, however the run ends
            reader = _InputReader(self.storage.blobs, job)
            stack.callback(reader.close)
            writer = _ResultWriter(partial(self._record, folder, job.id), job)
            stack.callback(writer.close)
            failure: _JobFailed | None = None
            # One result holds the outputs of consecutive batches whose rows have the same shapes.
            group: list[list[np.ndarray]] = []
            offset = end = job.rows_done
            size, started = 0, time.monotonic()
            for start, rows, feeds in reader.batches(job.batch_rows):
                if not writer.running():
                    break
                try:
                    outputs = session.run(job.output_names, feeds)
                except RunFailed as error:
                    failure = _JobFailed(f"onnxruntime failed on rows {start}-{start + rows - 1}: {error}")
                    break  # the batches before it are still recorded
                if group and [o.shape[1:] for o in outputs] != [o.shape[1:] for o in group[0]]:
                    writer.submit(offset, end - offset, group)
                    group, offset, size, started = [], end, 0, time.monotonic()
                group.append(outputs)
                size += sum(output.nbytes for output in outputs)
                end += rows
                if size >= RESULT_BYTES or time.monotonic() - started >= self.commit_seconds:
                    writer.submit(offset, end - offset, group)
                    group, offset, size, started = [], end, 0, time.monotonic()
            if group and writer.running():
                writer.submit(offset, end - offset, group)
            del group
            return writer.finish(), failure

    def _record(
        self, folder: Path, job_id: str, offset: int, rows: int, batches: list[list[np.ndarray]]
    ) -> JobRecord | None:
        """Store the outputs of rows [offset, offset + rows) and record them; the job as it now is."""
        current = self.storage.jobs.get(job_id)
        if current is None or current.state != JobState.RUNNING or current.rows_done != offset:
            return current  # gone, cancelled, or another worker got there first: store nothing
        shapes = tuple(output.shape[1:] for output in batches[0])
        result_path = folder / f"result-{offset}.npz"
        result_files.save_batches(result_path, batches)
        sha256 = sha256_of(result_path)

        def record() -> JobRecord:
            recorded = self.storage.jobs.record_batch(job_id, JobResult(offset, rows, sha256, shapes))
            if recorded is None:  # it changed since the look above
                raise _NotRecorded
            return recorded

        try:
            recorded = store_and_record(
                self.storage.metadata,
                self.storage.blobs,
                [(sha256, partial(self.storage.blobs.put_file, result_path, sha256))],
                record,
                jobs=self.storage.jobs,
            )
        except _NotRecorded:  # the result blob is gone again (unless another job uses the same bytes)
            return self.storage.jobs.get(job_id)
        finally:
            result_path.unlink(missing_ok=True)
        self.changes.notify(job_id)
        return recorded


class _InputReader:
    """A job's input rows from its rows_done on, read ahead on a thread of its own in windows of whole
    batches (one batch, then about WINDOW_BYTES each); the window read next waits in a queue of one."""

    def __init__(self, blobs: BlobStore, job: JobRecord):
        self.blobs = blobs
        self.job = job
        self.columns = [(tensor, dtypes.BY_NAME[tensor.dtype].numpy.newbyteorder("<")) for tensor in job.input.tensors]
        row_bytes = sum(dtype.itemsize * math.prod(tensor.row_shape) for tensor, dtype in self.columns)
        batches = max(1, WINDOW_BYTES // max(1, job.batch_rows * row_bytes))
        self.window_rows = job.batch_rows * min(batches, job.rows_total // job.batch_rows + 1)
        self._queue: queue.Queue[Window | BaseException | None] = queue.Queue(maxsize=1)
        self._closed = False
        self._thread = threading.Thread(target=self._read_all, name=f"job-{job.id[:8]}-input", daemon=True)
        self._thread.start()

    def _read_all(self) -> None:
        try:
            offset, rows = self.job.rows_done, self.job.batch_rows  # one batch first
            while offset < self.job.rows_total and not self._closed:
                rows = min(rows, self.job.rows_total - offset)
                self._queue.put(self._read(offset, rows))
                offset, rows = offset + rows, self.window_rows
            if not self._closed:
                self._queue.put(None)
        except BaseException as error:  # raised in the job's thread, which takes it from the queue
            self._queue.put(error)

    def _read(self, offset: int, rows: int) -> Window:
        columns = {}
        for tensor, dtype in self.columns:
            row_bytes = dtype.itemsize * math.prod(tensor.row_shape)
            data = np.empty(rows * row_bytes, np.uint8)
            if data.size:
                self.blobs.read_range(tensor.sha256, offset * row_bytes, data.data)
            columns[tensor.name] = data.view(dtype).reshape(rows, *tensor.row_shape)
        return offset, rows, columns

    def batches(self, batch_rows: int) -> Iterator[Window]:
        """(first row, rows, feeds) of each batch in row order, the feeds views of the window read."""
        while (window := self._queue.get()) is not None:
            if isinstance(window, BaseException):
                raise window
            offset, rows, columns = window
            del window
            for start in range(0, rows, batch_rows):
                count = min(batch_rows, rows - start)
                yield offset + start, count, {name: column[start : start + count] for name, column in columns.items()}

    def close(self) -> None:
        """Stop reading ahead; a read under way ends on its own, unwaited for."""
        self._closed = True
        while True:  # frees the queue's place, so a reader waiting to hand over a window sees the flag
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return


class _ResultWriter:
    """Stores and records a job's results in row order on a thread of its own while the next batches run;
    the result stored next waits in a queue of one."""

    def __init__(self, record: Callable[[int, int, list[list[np.ndarray]]], JobRecord | None], job: JobRecord):
        self._record = record
        self.job: JobRecord | None = job  # as last recorded
        self.error: BaseException | None = None
        self._stopped = False  # a record did not extend this run's: the job was cancelled, or another worker is ahead
        self._abandoned = False
        self._queue: queue.Queue[tuple[int, int, list[list[np.ndarray]]] | None] = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._write_all, name=f"job-{job.id[:8]}-results", daemon=True)
        self._thread.start()

    def _write_all(self) -> None:
        while (item := self._queue.get()) is not None:
            if not (self._stopped or self._abandoned or self.error):
                try:
                    offset, rows = item[0], item[1]
                    self.job = self._record(*item)
                    self._stopped = (
                        self.job is None or self.job.state != JobState.RUNNING or self.job.rows_done != offset + rows
                    )
                except BaseException as error:  # raised in the job's thread at its next hand-over
                    self.error = error
            del item  # the outputs go once stored

    def running(self) -> bool:
        """Whether the job still runs here; raises what storing a result raised."""
        if self.error is not None:
            raise self.error
        return not self._stopped

    def submit(self, offset: int, rows: int, batches: list[list[np.ndarray]]) -> None:
        """Store and record the outputs of rows [offset, offset + rows), after the results submitted before."""
        self.running()
        self._queue.put((offset, rows, batches))

    def finish(self) -> JobRecord | None:
        """The job as the last result recorded left it, once every result submitted is stored."""
        self._queue.put(None)
        self._thread.join()
        self.running()
        return self.job

    def close(self) -> None:
        """Store nothing more than the result under way (which ends first); a no-op after finish."""
        if self._thread.is_alive():
            self._abandoned = True
            self._queue.put(None)
            self._thread.join()


class _JobFailed(Exception):
    """The job cannot succeed; the message says why."""


class _NotRecorded(Exception):
    """The job was cancelled, or its rows recorded by another worker, while a result was stored."""
