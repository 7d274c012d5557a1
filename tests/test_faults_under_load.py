"""Each backend stopped and restarted while clients keep uploading, predicting and creating jobs.

A real `mds serve` and `mds worker` run on private FerretDB, MinIO and Redis instances. While one
backend is down every failing call is UNAVAILABLE and health is NOT_SERVING; once it is back
everything recovers without restarting MDS, no acknowledged upload or job is lost, and after
`mds gc` no blob is left that no record references.
"""

import hashlib
import itertools
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

import onnx_models
from backends import private_services, server_env
from harness import (
    DENSE,
    ONE,
    ServerProcess,
    chunked_input,
    in_process,
    mds_gc,
    outputs_of,
    request,
    results,
    storage_of,
    upload_requests,
    wait_for_health,
    wait_until,
    watch,
)
from mds.v1 import job_service_pb2 as jobs_pb
from mds.v1 import model_service_pb2 as pb
from mds_grpc.api.tensors import from_array

ROWS, BATCH = 6, 2
OPS = ("upload", "predict", "job")
NEEDS = {"mongo": {"upload", "job"}, "s3": {"upload", "job"}, "redis": {"job"}}  # calls that cannot succeed without it


class Hold:
    """Stops an upload stream after its first chunk (`reached`) until `release` is set."""

    def __init__(self):
        self.reached, self.release = threading.Event(), threading.Event()

    def stream(self, requests):
        yield next(requests)
        yield next(requests)
        self.reached.set()
        assert self.release.wait(120)
        yield from requests


class Load:
    """Client threads calling the server until stopped; every outcome is recorded."""

    def __init__(self, server: ServerProcess):
        self.server = server
        self.numbers = itertools.count(1)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.succeeded: Counter = Counter()
        self.failed: list[tuple[str, grpc.StatusCode, str]] = []
        self.uploaded: dict[str, tuple[str, float]] = {"adder": ("", 1.0)}  # acknowledged: name -> (sha256, scale)
        self.wrong: list[str] = []  # successful replies with wrong contents
        self.jobs: dict[str, tuple[str, np.ndarray]] = {}  # acknowledged job id -> (output, expected)
        self.threads = [threading.Thread(target=self._loop, args=(op,)) for op in ("upload", *OPS)]
        self.hold = Hold()  # for one upload the test keeps in flight

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.hold.release.set()
        for thread in self.threads:
            thread.join(120)

    def _loop(self, op: str) -> None:
        while not self.stopping.is_set():
            self.call(op)

    def call(self, op: str, *args) -> grpc.StatusCode:
        """One call of `op`, its outcome recorded and returned."""
        try:
            getattr(self, op)(next(self.numbers), *args)
        except grpc.RpcError as error:
            with self.lock:
                self.failed.append((op, error.code(), error.details()))
            return error.code()
        with self.lock:
            self.succeeded[op] += 1
        return grpc.StatusCode.OK

    def upload(self, n: int, hold: Hold | None = None) -> None:
        """Upload a model of its own, its stream stopped by `hold` if given."""
        name, scale = f"load-{n}", float(n)
        stream = upload_requests(name, onnx_models.add_two(scale), chunk_size=64)
        reply = self.server.models.UploadModel(hold.stream(stream) if hold else stream, timeout=120)
        with self.lock:
            self.uploaded[name] = (reply.sha256, scale)

    def predict(self, n: int) -> None:
        with self.lock:
            name, (_, scale) = list(self.uploaded.items())[n % len(self.uploaded)]
        z = outputs_of(self.server.inference.Predict(request(name, {"a": ONE, "b": ONE}), timeout=60))["z"]
        if z.tolist() != [2 * scale]:
            self.wrong.append(f"{name}: {z}")

    def job(self, n: int) -> None:
        """A job on "adder" with inline inputs, or on "dense" with an input uploaded in chunks."""
        if n % 2:
            x = np.full((ROWS, 8), n, np.float32)
            job_input = self.server.jobs.UploadJobInput(chunked_input(x, chunk_rows=BATCH), timeout=60)
            create = jobs_pb.CreateJobRequest(model="dense", input_id=job_input.id, batch_rows=BATCH)
            expected = ("scores", in_process(DENSE, x, BATCH)["scores"])
        else:
            a = np.arange(n, n + ROWS, dtype=np.float32)
            inputs = [from_array("a", a, True), from_array("b", np.ones(ROWS, np.float32), True)]
            create = jobs_pb.CreateJobRequest(model="adder", inputs=inputs, batch_rows=BATCH)
            expected = ("z", a + 1)
        job = self.server.jobs.CreateJob(create, timeout=60)
        with self.lock:
            self.jobs[job.id] = expected

    def calls_since(self, mark: tuple[Counter, int]) -> tuple[Counter, Counter]:
        """(successes, failures) by operation since `mark` (see `now`)."""
        with self.lock:
            return self.succeeded - mark[0], Counter(op for op, _, _ in self.failed[mark[1] :])

    def now(self) -> tuple[Counter, int]:
        with self.lock:
            return Counter(self.succeeded), len(self.failed)

    def wait(self, condition, what: str) -> None:
        """wait_until `condition`, saying on timeout what the clients saw."""
        try:
            wait_until(condition, 120, what)
        except AssertionError as error:
            raise AssertionError(f"{error}; succeeded {dict(self.succeeded)}, failed {self.failed[-5:]}") from None


def listed_models(server: ServerProcess) -> dict[str, tuple[int, str]]:
    models, token = {}, None
    while token != "":
        page = server.models.ListModels(pb.ListModelsRequest(page_token=token or ""), timeout=60)
        models.update({m.name: (m.version, m.sha256) for m in page.models})
        token = page.next_page_token
    return models


@pytest.fixture
def stack(tmp_path):
    """A server and worker on private backends, with models "adder" and "dense" uploaded."""
    with private_services(tmp_path) as backends:
        server = ServerProcess(tmp_path / "server", **server_env(*backends)).start()
        server.models.UploadModel(upload_requests("adder", onnx_models.add_two()), timeout=60)
        server.models.UploadModel(upload_requests("dense", DENSE), timeout=60)
        yield server, dict(zip(("mongo", "s3", "redis"), backends, strict=True))
        assert server.stop() == 0


@pytest.mark.parametrize("victim", ["mongo", "s3", "redis"])
def test_a_backend_restarted_under_load_loses_no_acknowledged_write(stack, victim, tmp_path):
    server, backends = stack
    with ThreadPoolExecutor(1) as pool, Load(server) as load:
        start = load.now()
        load.wait(lambda: all(load.calls_since(start)[0][op] >= 2 for op in OPS), "every call to succeed")
        held = pool.submit(load.call, "upload", load.hold)  # in flight across the stop
        assert load.hold.reached.wait(60)
        backends[victim].stop()
        wait_for_health(server, health_pb2.HealthCheckResponse.NOT_SERVING)
        down = load.now()
        load.wait(lambda: NEEDS[victim] <= set(load.calls_since(down)[1]), f"calls to fail without {victim}")
        load.hold.release.set()
        assert held.result(120) == (grpc.StatusCode.UNAVAILABLE if "upload" in NEEDS[victim] else grpc.StatusCode.OK)
        backends[victim].start()
        wait_for_health(server, health_pb2.HealthCheckResponse.SERVING)
        back = load.now()
        load.wait(lambda: all(load.calls_since(back)[0][op] >= 3 for op in OPS), "every call to recover")
    assert [f for f in load.failed if f[1] != grpc.StatusCode.UNAVAILABLE] == [] and load.wrong == []

    # Every acknowledged upload is listed, unchanged. An upload answered UNAVAILABLE may be listed too, when
    # the store applied its record but the reply was lost as the store stopped; every listed blob is whole.
    listed = listed_models(server)
    unacknowledged = set(listed) - {*load.uploaded, "dense"}
    assert {*load.uploaded, "dense"} <= set(listed)
    assert len(unacknowledged) <= sum(op == "upload" for op, _, _ in load.failed)
    storage = storage_of(server)
    for name, (version, sha256) in listed.items():
        if name in load.uploaded and name != "adder":
            assert (version, sha256) == (1, load.uploaded[name][0])
        copy = tmp_path / f"{name}.onnx"
        storage.blobs.fetch_to(sha256, copy)
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == sha256
    # Every acknowledged job completes, every row exactly once.
    for job_id, (output, want) in load.jobs.items():
        final = watch(server, job_id)[-1]
        assert (final.state, final.rows_done) == (jobs_pb.JOB_STATE_SUCCEEDED, ROWS), final.error
        batches, got = results(server, job_id)
        ends = np.cumsum([b.rows for b in batches])  # batches recorded one by one or several together
        assert [b.row_offset for b in batches] == [0, *ends[:-1]] and ends[-1] == ROWS
        np.testing.assert_array_equal(got[output], want)
    # After gc, the bucket holds exactly the blobs records reference.
    mds_gc(server)
    assert set(server.blobs()) == storage.metadata.referenced_blobs() | storage.jobs.referenced_blobs()


def test_a_delete_while_the_object_store_is_down_is_done_and_gc_removes_the_blob_later(stack):
    """The record goes at once; the blob, which no record references any more, is left for `mds gc`."""
    server, backends = stack
    sha256 = server.models.UploadModel(upload_requests("doomed", onnx_models.add_two(9.0)), timeout=60).sha256
    backends["s3"].stop()
    wait_for_health(server, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert server.models.DeleteModel(pb.DeleteModelRequest(name="doomed"), timeout=60).deleted_versions == [1]
    assert "doomed" not in listed_models(server)
    backends["s3"].start()
    wait_for_health(server, health_pb2.HealthCheckResponse.SERVING)
    assert sha256 in server.blobs()
    assert mds_gc(server)["orphan_blobs"] == [sha256]
    assert sha256 not in server.blobs()
