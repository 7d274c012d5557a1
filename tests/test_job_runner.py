"""A job's worker driven directly, on embedded storage and on MongoDB + S3: its input read in ranges as the
batches need them, results stored while later batches run, watchers woken at each change; and the ranged
reads and result files it relies on."""

import asyncio
import hashlib
import threading
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

import onnx_models
from harness import mongo_s3_settings, parts
from mds_grpc.config import load_settings
from mds_grpc.core import dtypes, job_runner, result_files
from mds_grpc.core.errors import InvalidArgument
from mds_grpc.core.job_records import JobState
from mds_grpc.core.jobs import ColumnSpec
from mds_grpc.core.stores import Storage
from mds_grpc.core.uploads import UploadHeader
from mds_grpc.server import build_core
from mds_grpc.storage.local_blobs import LocalBlobStore
from mds_grpc.storage.s3_blobs import S3BlobStore

COLUMNS = ("BOOL", "INT64", "FP16")  # rows of 2 + 16 + 4 bytes
ROW_BYTES = 22
LATER = datetime.now(UTC) + timedelta(days=1)


@pytest.fixture(params=["embedded", "mongo-s3"])
def core(request, tmp_path):
    settings: dict = {"data_dir": tmp_path / "data", "redis_url": ""}
    if request.param == "mongo-s3":
        settings.update(mongo_s3_settings(request.getfixturevalue("services"), "runner-" + uuid.uuid4().hex[:12]))
    return build_core(load_settings(**settings))


def columns(rows: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rows)
    return {
        "x_BOOL": rng.random((rows, 2)) > 0.5,
        "x_INT64": rng.integers(-(2**62), 2**62, (rows, 2)),
        "x_FP16": rng.standard_normal((rows, 2)).astype(np.float16),
    }


async def new_job(core, rows: int, batch_rows: int, chunk_rows: int = 100):
    """A job of the identity model over `rows` rows of three columns, uploaded in chunks; and those columns."""
    await core.registry.upload(UploadHeader(name="ids"), parts(onnx_models.identity_all_dtypes(COLUMNS)))
    x = columns(rows)

    async def chunks():
        for start in range(0, rows, chunk_rows):
            yield {name: a[start : start + chunk_rows] for name, a in x.items()}

    specs = [ColumnSpec(name, name.removeprefix("x_"), a.shape) for name, a in x.items()]
    job_input = await core.jobs.upload_input(specs, chunks())
    return await core.jobs.create("ids", 0, None, job_input.id, [], batch_rows), x


async def outputs_of(core, job_id: str) -> tuple[list[tuple[int, int]], dict[str, np.ndarray]]:
    """(offset, rows) of each message of the job's results, and each output over all of them."""
    batches = [b async for b in core.jobs.results(await core.jobs.get(job_id))]
    names = batches[0][2].keys()
    return [(o, r) for o, r, _ in batches], {n: np.concatenate([b[2][n] for b in batches]) for n in names}


class Spy:
    """A store whose calls are all passed on; `before` runs first with the method's name and arguments."""

    def __init__(self, store, before):
        self._store, self._before = store, before

    def __getattr__(self, name: str):
        method = getattr(self._store, name)

        def call(*args, **kwargs):
            self._before(name, *args)
            return method(*args, **kwargs)

        return call


async def test_the_input_is_read_in_windows_as_batches_need_it_and_results_stored_while_later_batches_run(
    core, tmp_path, monkeypatch
):
    rows, batch_rows = 1000, 16
    monkeypatch.setattr(job_runner, "WINDOW_BYTES", 3 * batch_rows * ROW_BYTES)  # 3 batches a window
    monkeypatch.setattr(job_runner, "RESULT_BYTES", 1000)  # 3 batches a result (352 bytes of outputs each)
    job, x = await new_job(core, rows, batch_rows)
    inputs = {t.sha256: t for t in job.input.tensors}
    window_rows = result_rows = 3 * batch_rows
    windows = [(0, batch_rows)] + [  # (first row, rows): one batch first, so that the first run starts soon
        (first, min(window_rows, rows - first)) for first in range(batch_rows, rows, window_rows)
    ]
    reads: list[tuple[str, int, int]] = []  # (column, first row, rows) of each ranged read begun
    ran: list[tuple[int, int]] = []  # (first row, windows read by then) of each batch run
    second_result_running = threading.Event()  # a batch of the third result has run

    def on_blobs(name, *args):
        if name == "fetch_to":
            assert args[0] not in inputs, "the input was fetched whole"
        if name == "read_range":
            sha256, offset, into = args
            tensor = inputs[sha256]
            row_bytes = dtypes.BY_NAME[tensor.dtype].numpy.itemsize * 2
            reads.append((tensor.name, offset // row_bytes, len(into) // row_bytes))

    def on_jobs(name, *args):
        if name == "record_batch" and args[1].offset == 0:  # the first result waits until later batches ran
            assert second_result_running.wait(30), "no batch ran while the first result was being stored"

    real_run = job_runner.OnnxSession.run

    def run(self, output_names, feeds, *rest):
        assert self._session.get_session_options().enable_cpu_mem_arena  # a job's runs reuse their memory
        first = len(ran) * batch_rows
        ran.append((first, sum(1 for name, _, _ in reads if name == "x_BOOL")))
        if first >= 2 * result_rows:
            second_result_running.set()
        return real_run(self, output_names, feeds, *rest)

    monkeypatch.setattr(job_runner.OnnxSession, "run", run)
    spied = Storage(core.storage.metadata, Spy(core.storage.blobs, on_blobs), Spy(core.storage.jobs, on_jobs))
    await asyncio.to_thread(job_runner.JobRunner(spied, tmp_path / "work", 1, commit_seconds=600).run, job.id)

    done = await core.jobs.get(job.id)
    assert (done.state, done.rows_done) == (JobState.SUCCEEDED, rows), done.error
    for name in x:  # each column read once, window after window
        assert [(first, count) for column, first, count in reads if column == name] == windows
    assert [first for first, _ in ran] == list(range(0, rows, batch_rows))
    for first, windows_read in ran:  # ahead by the window in use, the one waiting and the one being read
        in_use = max(i for i, (start, _) in enumerate(windows) if start <= first)
        assert windows_read <= in_use + 3
    assert [(r.offset, r.rows) for r in done.results] == [
        (first, min(result_rows, rows - first)) for first in range(0, rows, result_rows)
    ]
    _, got = await outputs_of(core, job.id)
    for name, column in x.items():
        np.testing.assert_array_equal(got[name.replace("x_", "y_")], column)


async def test_a_job_cancelled_while_it_runs_stops_reading_running_and_storing(core, tmp_path, monkeypatch):
    rows, batch_rows = 2000, 10
    monkeypatch.setattr(job_runner, "WINDOW_BYTES", batch_rows * ROW_BYTES)
    job, _ = await new_job(core, rows, batch_rows)
    cancelled = threading.Event()
    real_run = job_runner.OnnxSession.run
    runs = []

    def run(self, output_names, feeds, *rest):
        runs.append(1)
        if not cancelled.is_set():
            asyncio.run_coroutine_threadsafe(core.jobs.cancel(job.id), loop).result(30)
            cancelled.set()
        return real_run(self, output_names, feeds, *rest)

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(job_runner.OnnxSession, "run", run)
    await asyncio.to_thread(job_runner.JobRunner(core.storage, tmp_path / "work", 1, commit_seconds=0).run, job.id)
    done = await core.jobs.get(job.id)
    assert done.state == JobState.CANCELLED
    assert done.rows_done == 0 and len(runs) <= 4  # the batches already handed to the writer at most
    blobs = set(core.storage.blobs.list_blobs(LATER))
    assert {r.sha256 for r in done.results} <= blobs


async def test_a_watch_in_the_workers_process_sees_each_change_at_once(core, tmp_path):
    core.jobs.poll_seconds = 600  # only a wake-up can end the watches below in time
    job, _ = await new_job(core, 500, 50)
    runner = job_runner.JobRunner(core.storage, tmp_path / "work", 1, commit_seconds=0)

    async def watch(job_id: str) -> list:
        return [(j.state, j.rows_done) async for j in core.jobs.watch(job_id)]

    watching = asyncio.ensure_future(asyncio.wait_for(watch(job.id), 60))
    await asyncio.sleep(0.2)  # the watch waits
    await asyncio.to_thread(runner.run, job.id)
    seen = await watching
    assert seen[0] == (JobState.QUEUED, 0) and seen[-1] == (JobState.SUCCEEDED, 500)
    assert [done for state, done in seen if state == JobState.RUNNING] == sorted(
        done for state, done in seen if state == JobState.RUNNING
    )

    queued, _ = await new_job(core, 10, 5)
    watching = asyncio.ensure_future(asyncio.wait_for(watch(queued.id), 60))
    await asyncio.sleep(0.2)
    await core.jobs.cancel(queued.id)
    assert (await watching)[-1] == (JobState.CANCELLED, 0)


async def test_a_job_input_streams_to_an_object_store_and_a_failed_one_leaves_nothing(core):
    streams = core.storage.blobs.open_upload() is not None
    put_files: list[str] = []
    core.jobs.storage = Storage(
        core.storage.metadata,
        Spy(core.storage.blobs, lambda name, *args: name == "put_file" and put_files.append(args[1])),
        core.storage.jobs,
    )
    x = np.arange(40, dtype=np.float32).reshape(10, 4)

    async def chunks(rows):
        for start in range(0, rows, 3):
            yield {"x": x[start : min(start + 3, rows)]}

    job_input = await core.jobs.upload_input([ColumnSpec("x", "FP32", x.shape)], chunks(10))
    (tensor,) = job_input.tensors
    assert tensor.sha256 == hashlib.sha256(x.tobytes()).hexdigest()
    assert put_files == ([] if streams else [tensor.sha256])  # no local file to put where the store takes streams
    into = bytearray(16)
    core.storage.blobs.read_range(tensor.sha256, 16 * 9, memoryview(into))
    assert bytes(into) == x[9].tobytes()

    before = set(core.storage.blobs.list_blobs(LATER))
    with pytest.raises(InvalidArgument, match="received 7 rows, the header declared 10"):
        await core.jobs.upload_input([ColumnSpec("x", "FP32", x.shape)], chunks(7))
    assert set(core.storage.blobs.list_blobs(LATER)) == before
    assert core.storage.blobs.sweep_partial(LATER) == []


@pytest.fixture(params=["local", "s3"])
def blobs(request, tmp_path):
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    env = request.getfixturevalue("services")
    return S3BlobStore(
        env["MDS_S3_ENDPOINT"], env["MDS_S3_ACCESS_KEY"], env["MDS_S3_SECRET_KEY"], "ranges-" + uuid.uuid4().hex[:12]
    )


def test_ranged_reads_of_put_and_streamed_blobs(blobs, tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 3 << 20, np.uint8).tobytes()  # more than one GET piece
    path = tmp_path / "blob"
    path.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    blobs.put_file(path, sha)
    streamed = data[::-1]
    streamed_sha = hashlib.sha256(streamed).hexdigest()
    upload = blobs.open_upload()
    if upload is None:  # a folder takes files only
        (tmp_path / "streamed").write_bytes(streamed)
        blobs.put_file(tmp_path / "streamed", streamed_sha)
    else:
        upload.write(streamed)
        assert upload.commit(streamed_sha)
    for blob, sha256 in ((data, sha), (streamed, streamed_sha)):
        for offset, size in ((0, len(blob)), (5, 7), ((1 << 20) - 3, (1 << 20) + 6), (len(blob) - 1, 1), (9, 0)):
            into = bytearray(size)
            blobs.read_range(sha256, offset, memoryview(into))
            assert bytes(into) == blob[offset : offset + size]
        with pytest.raises(EOFError):
            blobs.read_range(sha256, len(blob) - 2, memoryview(bytearray(3)))
    with pytest.raises(FileNotFoundError):
        blobs.read_range("0" * 64, 0, memoryview(bytearray(1)))


def test_result_files_written_batch_by_batch_load_as_their_concatenation(tmp_path):
    rng = np.random.default_rng(1)

    def batch(rows: int) -> list[np.ndarray]:
        return [
            rng.standard_normal((rows, 3)).astype(np.float32),
            rng.integers(0, 9, rows),
            rng.random((rows, 2, 2)) > 0.5,
            rng.standard_normal((rows, 4)).astype(dtypes.BY_NAME["BF16"].numpy),
            np.zeros((rows, 0), np.float16),
        ]

    batches = [batch(5), batch(7), batch(0), batch(1)]
    result_files.save_batches(tmp_path / "batches.npz", batches)
    loaded = result_files.load(tmp_path / "batches.npz", 5)
    for got, parts_ in zip(loaded, zip(*batches, strict=True), strict=True):
        want = np.concatenate(parts_)
        assert (got.dtype, got.shape) == (want.dtype, want.shape)
        assert got.tobytes() == want.tobytes()
