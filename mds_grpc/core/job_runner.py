"""Running a bulk job: batches of rows through the model's session, each result recorded once."""

import logging
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from mds_grpc.core import dtypes, result_files
from mds_grpc.core.errors import FailedPrecondition, Unavailable
from mds_grpc.core.garbage import store_and_record
from mds_grpc.core.job_records import JobRecord, JobResult, JobState
from mds_grpc.core.model_cache import materialize
from mds_grpc.core.placement import Placer
from mds_grpc.core.records import MAIN_FILE
from mds_grpc.core.runtime import OnnxSession, RunFailed
from mds_grpc.core.stores import Storage
from mds_grpc.core.uploads import sha256_of

log = logging.getLogger("mds.jobs")
RESULT_BYTES = 16 << 20  # outputs stored in one result blob, at most about


def read_rows(path: Path, dtype: str, rows: int, row_shape: tuple[int, ...]) -> np.ndarray:
    """A job input column, memory-mapped (never loaded whole)."""
    numpy_dtype = dtypes.BY_NAME[dtype].numpy.newbyteorder("<")
    if rows == 0 or 0 in row_shape:
        return np.empty((rows, *row_shape), numpy_dtype)
    return np.memmap(path, dtype=numpy_dtype, mode="r", shape=(rows, *row_shape))


class JobRunner:
    """Runs one job to a terminal state; safe to run again (after a crash) or twice at once."""

    def __init__(
        self,
        storage: Storage,
        work_dir: Path,
        intra_op_threads: int = 0,
        commit_seconds: float = 1.0,
        placer: Placer | None = None,
    ):
        self.storage = storage
        self.placer = placer or Placer()  # a job runs where its version's predictions run
        self.work_dir = Path(work_dir)
        self.intra_op_threads = intra_op_threads
        # Batches run until this much time (or RESULT_BYTES of outputs) has passed, then their outputs
        # are stored and recorded together: each record costs a blob write and a conditional update.
        self.commit_seconds = commit_seconds

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

    def _run(self, job_id: str, folder: Path) -> None:
        jobs = self.storage.jobs
        job = jobs.get(job_id)
        if job is None or job.state.terminal:
            return
        if job.state == JobState.QUEUED:
            job = jobs.transition(job_id, {JobState.QUEUED}, JobState.RUNNING) or jobs.get(job_id)
        if job is not None and job.state == JobState.RUNNING:
            self._run_batches(job, folder)

    def _run_batches(self, job: JobRecord, folder: Path) -> None:
        spent = Stopwatch()  # where the job's time went, in its last log line
        record = self.storage.metadata.get(job.model, job.version)
        if record is None:
            raise _JobFailed(f"model {job.model!r} version {job.version} was deleted")
        try:
            spent.start("load")
            target = self.placer.target(record.name, record.version, record.placement)
            path = materialize(self.storage.blobs, record, folder / "model") / MAIN_FILE
            session = OnnxSession(path, self.intra_op_threads, target=target)
        except FailedPrecondition as error:
            raise _JobFailed(str(error)) from None
        spent.start("fetch")
        columns = {}
        for i, tensor in enumerate(job.input.tensors):
            path = folder / f"input-{i}"  # never a client-chosen name in a path
            if job.rows_total:
                self.storage.blobs.fetch_to(tensor.sha256, path)
            columns[tensor.name] = read_rows(path, tensor.dtype, job.rows_total, tensor.row_shape)

        def run_batch(offset: int, rows: int) -> list[np.ndarray]:
            feeds = {name: np.ascontiguousarray(column[offset : offset + rows]) for name, column in columns.items()}
            try:
                return session.run(job.output_names, feeds)
            except RunFailed as error:
                raise _JobFailed(f"onnxruntime failed on rows {offset}-{offset + rows - 1}: {error}") from None

        # (offset, outputs) of a batch whose rows differ in shape from the result before it
        carried: tuple[int, list[np.ndarray]] | None = None
        while job.rows_done < job.rows_total:
            offset = end = job.rows_done
            batches: list[list[np.ndarray]] = []
            size, started, failure = 0, time.monotonic(), None
            while end < job.rows_total and (
                not batches or size < RESULT_BYTES and time.monotonic() - started < self.commit_seconds
            ):
                rows = min(job.batch_rows, job.rows_total - end)
                try:
                    spent.start("run")
                    outputs = carried[1] if carried is not None and carried[0] == end else run_batch(end, rows)
                except _JobFailed as error:
                    failure = error  # the batches before it are still recorded
                    break
                carried = None
                if batches and [o.shape[1:] for o in outputs] != [o.shape[1:] for o in batches[0]]:
                    carried = (end, outputs)  # one result holds rows of one shape: these start the next
                    break
                batches.append(outputs)
                size += sum(output.nbytes for output in batches[-1])
                end += rows
            if batches:
                spent.start("store")
                recorded = self._record(job, folder, offset, end - offset, batches)
                if recorded is None or recorded.state != JobState.RUNNING:
                    return
                job = recorded
            if failure is not None:
                raise failure
        self.storage.jobs.transition(job.id, {JobState.RUNNING}, JobState.SUCCEEDED)
        log.info("job succeeded", extra={"job": job.id, "rows": job.rows_total, "seconds": spent.totals()})

    def _record(
        self, job: JobRecord, folder: Path, offset: int, rows: int, batches: list[list[np.ndarray]]
    ) -> JobRecord | None:
        """Store the outputs of rows [offset, offset + rows) and record them; the job as it now is."""
        current = self.storage.jobs.get(job.id)
        if current is None or current.state != JobState.RUNNING or current.rows_done != offset:
            return current  # gone, cancelled, or another worker got there first: store nothing
        outputs = batches[0] if len(batches) == 1 else [np.concatenate(parts) for parts in zip(*batches, strict=True)]
        result_path = folder / f"result-{offset}.npz"
        result_files.save(result_path, outputs)
        sha256 = sha256_of(result_path)

        def record() -> JobRecord:
            shapes = tuple(output.shape[1:] for output in outputs)
            recorded = self.storage.jobs.record_batch(job.id, JobResult(offset, rows, sha256, shapes))
            if recorded is None:  # it changed since the look above
                raise _NotRecorded
            return recorded

        try:
            return store_and_record(
                self.storage.metadata,
                self.storage.blobs,
                [(sha256, partial(self.storage.blobs.put_file, result_path, sha256))],
                record,
                jobs=self.storage.jobs,
            )
        except _NotRecorded:  # the result blob is gone again (unless another job uses the same bytes)
            return self.storage.jobs.get(job.id)


class Stopwatch:
    """Seconds spent per phase: each start() ends the phase before it."""

    def __init__(self):
        self._totals: dict[str, float] = {}
        self._phase, self._since = "", time.perf_counter()

    def start(self, phase: str) -> None:
        now = time.perf_counter()
        if self._phase:
            self._totals[self._phase] = self._totals.get(self._phase, 0.0) + now - self._since
        self._phase, self._since = phase, now

    def totals(self) -> dict[str, float]:
        """The seconds of each phase so far, the one under way included, rounded to milliseconds."""
        self.start("")
        return {phase: round(seconds, 3) for phase, seconds in self._totals.items()}


class _JobFailed(Exception):
    """The job cannot succeed; the message says why."""


class _NotRecorded(Exception):
    """The job was cancelled, or its rows recorded by another worker, while a result was stored."""
