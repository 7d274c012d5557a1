"""Three servers and two workers on MinIO + FerretDB + Redis behind Envoy, under steady load over gRPC and REST:
restarting each server in turn (and a worker) with SIGTERM fails no call and breaks no stream; a SIGKILL fails at
most the calls in flight on that server; every job finishes with each row exactly once."""

import signal
import threading
import time
import uuid
from collections import Counter

import grpc
import numpy as np
import pytest
import requests

import onnx_models
from harness import EnvoyProcess, ServerProcess, WorkerProcess, backend_env, request, upload_requests, wait_until
from mds.v1 import inference_service_pb2_grpc, job_service_pb2, job_service_pb2_grpc, model_service_pb2_grpc
from mds_grpc.api.tensors import from_array

MODEL = "rolling"
X = {"x": np.ones((2, 8), np.float32)}
JOB_ROWS = 2000


class Load:
    """Steady load through Envoy until stopped: unary Predict and 10-message PredictStreams over gRPC, predictions
    over REST, and jobs; it counts what it sent and what failed, by kind."""

    def __init__(self, envoy: EnvoyProcess):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{envoy.port}")
        self.inference = inference_service_pb2_grpc.InferenceServiceStub(self.channel)
        self.jobs = job_service_pb2_grpc.JobServiceStub(self.channel)
        self.url = f"{envoy.url}/v1/models/{MODEL}:predict"
        self.sent, self.failed = Counter(), Counter()
        self.job_ids: list[str] = []
        self.stop = threading.Event()
        kinds = [self.unary, self.unary, self.stream, self.rest, self.job]
        self.threads = [threading.Thread(target=self.run, args=(kind,)) for kind in kinds]
        for thread in self.threads:
            thread.start()

    def run(self, kind) -> None:
        while not self.stop.is_set():
            self.sent[kind.__name__] += 1
            try:
                kind()
            except (grpc.RpcError, requests.RequestException, AssertionError) as error:
                self.failed[kind.__name__] += 1
                print(f"{time.time():.3f} {kind.__name__} failed: {str(error)[:300]}")

    def unary(self) -> None:
        assert self.inference.Predict(request(MODEL, X), timeout=30).version == 1

    def stream(self) -> None:
        replies = list(self.inference.PredictStream(iter([request(MODEL, X)] * 10), timeout=30))
        assert len(replies) == 10 and not any(r.HasField("error") for r in replies)

    def rest(self) -> None:
        body = {
            "inputs": [
                {"name": "x", "dtype": "DATA_TYPE_FP32", "shape": [2, 8], "contents": {"fp32Contents": [1] * 16}}
            ]
        }
        reply = requests.post(self.url, json=body, timeout=30)
        assert reply.status_code == 200, reply.text

    def job(self) -> None:
        rows = np.ones((JOB_ROWS, 8), np.float32)
        created = self.jobs.CreateJob(
            job_service_pb2.CreateJobRequest(model=MODEL, inputs=[from_array("x", rows, raw=True)], batch_rows=100),
            timeout=30,
        )
        self.job_ids.append(created.id)
        self.stop.wait(0.5)  # a job every half second or so: the other kinds are the steady load

    def finish(self) -> tuple[Counter, Counter]:
        self.stop.set()
        for thread in self.threads:
            thread.join()
        sent, failed = self.sent.copy(), self.failed.copy()
        self.sent.clear()
        self.failed.clear()
        return sent, failed


def healthy_in(envoy: EnvoyProcess, server: ServerProcess) -> bool:
    clusters = requests.get(f"http://127.0.0.1:{envoy.admin_port}/clusters").text
    return f"mds::127.0.0.1:{server.port}::health_flags::healthy" in clusters


def stop_server(server: ServerProcess, signum: int) -> int:
    server.process.send_signal(signum)
    code = server.process.wait(60)
    server.stdout.close()
    server.channel.close()
    return code


@pytest.fixture
def fleet(services, tmp_path):
    env = {**backend_env(services, f"mds-rolling-{uuid.uuid4().hex[:12]}"), "MDS_DRAIN_SECONDS": "2"}
    servers = [ServerProcess(tmp_path / f"server-{i}", **env).start(with_worker=False) for i in range(3)]
    workers = [WorkerProcess(servers[0], f"worker-{i}") for i in range(2)]
    envoy = EnvoyProcess(*servers)
    yield envoy, servers, workers
    envoy.stop()
    for worker in workers:
        assert worker.stop() == 0
    for server in servers:
        if server.process.poll() is None:
            assert stop_server(server, signal.SIGTERM) == 0


def test_rolling_restarts_fail_nothing_and_a_kill_only_what_was_in_flight(fleet):
    envoy, servers, workers = fleet
    models = model_service_pb2_grpc.ModelServiceStub(grpc.insecure_channel(f"127.0.0.1:{envoy.port}"))
    models.UploadModel(upload_requests(MODEL, onnx_models.dense()), timeout=120)
    load = Load(envoy)
    for server in servers:
        assert stop_server(server, signal.SIGTERM) == 0
        server.start(with_worker=False)
        wait_until(lambda s=server: healthy_in(envoy, s), what="Envoy to send to the restarted server again")
    assert workers[0].stop(signal.SIGTERM) == 0  # its current batch finishes or goes back to the queue
    workers[0] = WorkerProcess(servers[0], "worker-0-again")
    retried = envoy.stat("cluster.mds.upstream_rq_retry")
    sent, failed = load.finish()
    job_ids = load.job_ids
    print(f"SIGTERM restarts: sent {dict(sent)}, failed {dict(failed)}, retried by Envoy {retried}")
    assert not failed and all(sent[kind] > 0 for kind in ("unary", "stream", "rest", "job"))

    load = Load(envoy)
    wait_until(lambda: sum(load.sent.values()) > 50, what="load before the kill")
    assert stop_server(servers[1], signal.SIGKILL) == -signal.SIGKILL
    servers[1].start(with_worker=False)
    wait_until(lambda: healthy_in(envoy, servers[1]), what="Envoy to send to the restarted server again")
    sent, failed = load.finish()
    print(
        f"SIGKILL: sent {dict(sent)}, failed {dict(failed)} (calls in flight on the killed server may fail), "
        f"retried by Envoy {envoy.stat('cluster.mds.upstream_rq_retry') - retried}"
    )
    assert sum(failed.values()) <= 8  # at most what was in flight: 5 load threads, each a call or a stream

    jobs = job_service_pb2_grpc.JobServiceStub(servers[0].channel)
    for job_id in [*job_ids, *load.job_ids]:
        final = list(jobs.WatchJob(job_service_pb2.WatchJobRequest(id=job_id), timeout=120))[-1]
        assert final.state == job_service_pb2.JOB_STATE_SUCCEEDED, final.error
        batches = list(jobs.GetJobResults(job_service_pb2.GetJobResultsRequest(id=job_id), timeout=120))
        offsets = [(b.row_offset, b.rows) for b in batches]
        assert [o for o, _ in offsets] == list(np.cumsum([0] + [r for _, r in offsets])[:-1])
        assert sum(r for _, r in offsets) == JOB_ROWS
