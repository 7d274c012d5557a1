"""MongoDB + S3 as the source of truth: shared by several servers, and survived when they fail."""

import uuid

import grpc
import numpy as np
import pytest
import requests
from grpc_health.v1 import health_pb2

import onnx_models
from backends import ferretdb, minio, redis, server_env
from harness import (
    ONE,
    EnvoyProcess,
    ServerProcess,
    assert_status,
    backend_env,
    outputs_of,
    request,
    upload_requests,
    wait_for_health,
)
from mds.v1 import job_service_pb2 as jobs_pb
from mds.v1 import model_service_pb2 as pb
from mds_grpc.api.tensors import from_array


def test_two_servers_share_models_and_versions(services, tmp_path):
    env = backend_env(services, f"shared-{uuid.uuid4().hex[:12]}")
    first = ServerProcess(tmp_path / "a", **env).start()
    second = ServerProcess(tmp_path / "b", **env).start()
    try:
        assert first.models.UploadModel(upload_requests("shared", onnx_models.add_two(2.0))).version == 1
        assert second.models.UploadModel(upload_requests("shared", onnx_models.add_two(3.0))).version == 2
        for server in (first, second):  # each pulls the other's model from the object store on demand
            for version, want in ((1, 4.0), (2, 6.0)):
                reply = server.inference.Predict(request("shared", {"a": ONE, "b": ONE}, version=version))
                assert outputs_of(reply)["z"].tolist() == [want]
        second.models.DeleteModel(pb.DeleteModelRequest(name="shared", version=1))
        assert_status(
            lambda: first.models.GetModel(pb.GetModelRequest(name="shared", version=1)), grpc.StatusCode.NOT_FOUND
        )
    finally:
        assert first.stop() == 0 and second.stop() == 0


@pytest.fixture
def fragile(tmp_path):
    """A server and worker on private FerretDB, MinIO and Redis instances that a test may stop and restart."""
    mongo, s3, queue = (
        ferretdb(tmp_path / "ferretdb").start(),
        minio(tmp_path / "minio").start(),
        redis(tmp_path / "redis").start(),
    )
    try:
        server = ServerProcess(tmp_path / "server", **server_env(mongo, s3, queue)).start()
        server.models.UploadModel(upload_requests("adder", onnx_models.add_two()))
        yield server, mongo, s3, queue
        assert server.stop() == 0
    finally:
        for backend in (mongo, s3, queue):
            backend.stop()


def test_mongodb_down_is_unavailable_then_recovers(fragile):
    server, mongo, _, _ = fragile
    envoy = EnvoyProcess(server)
    mongo.stop()
    wait_for_health(server, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert_status(
        lambda: server.models.GetModel(pb.GetModelRequest(name="adder")),
        grpc.StatusCode.UNAVAILABLE,
        f"MongoDB at 127.0.0.1:{mongo.port} is unreachable",
    )
    over_rest = requests.get(f"{envoy.url}/v1/models/adder")
    envoy.stop()
    assert over_rest.status_code == 503 and "MongoDB" in over_rest.json()["message"]
    assert_status(
        lambda: server.models.UploadModel(upload_requests("other", onnx_models.add_two())),
        grpc.StatusCode.UNAVAILABLE,
        "MongoDB",
    )
    mongo.start()
    wait_for_health(server, health_pb2.HealthCheckResponse.SERVING)
    assert server.models.GetModel(pb.GetModelRequest(name="adder")).version == 1
    assert server.models.UploadModel(upload_requests("other", onnx_models.add_two())).version == 1


def test_object_store_down_is_unavailable_then_recovers(fragile):
    server, _, s3, _ = fragile
    s3.stop()
    wait_for_health(server, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert_status(
        lambda: server.models.UploadModel(upload_requests("other", onnx_models.add_two(5.0))),
        grpc.StatusCode.UNAVAILABLE,
        f"object store at 127.0.0.1:{s3.port} is unreachable",
    )
    # A model already loaded keeps serving from its local copy.
    assert outputs_of(server.inference.Predict(request("adder", {"a": ONE, "b": ONE})))["z"].tolist() == [2.0]
    s3.start()
    wait_for_health(server, health_pb2.HealthCheckResponse.SERVING)
    assert server.models.UploadModel(upload_requests("other", onnx_models.add_two(5.0))).version == 1
    assert len(server.blobs()) == 2  # the failed upload left no object behind
    np.testing.assert_array_equal(
        outputs_of(server.inference.Predict(request("other", {"a": ONE, "b": ONE})))["z"], [10.0]
    )


def test_redis_down_is_unavailable_then_recovers(fragile):
    server, _, _, queue = fragile
    inputs = [from_array("a", ONE.reshape(1, 1).ravel(), True), from_array("b", ONE, True)]
    create = jobs_pb.CreateJobRequest(model="adder", inputs=inputs)
    queue.stop()
    wait_for_health(server, health_pb2.HealthCheckResponse.NOT_SERVING)
    details = assert_status(
        lambda: server.jobs.CreateJob(create), grpc.StatusCode.UNAVAILABLE, "could not queue the job"
    )
    assert "Redis" in details or "Connection" in details
    queue.start()
    wait_for_health(server, health_pb2.HealthCheckResponse.SERVING)
    job = server.jobs.CreateJob(create)
    final = list(server.jobs.WatchJob(jobs_pb.WatchJobRequest(id=job.id), timeout=60))[-1]
    assert final.state == jobs_pb.JOB_STATE_SUCCEEDED
    (failed,) = server.jobs.ListJobs(jobs_pb.ListJobsRequest(state=jobs_pb.JOB_STATE_FAILED)).jobs
    assert "could not queue the job" in failed.error  # the job that could not be queued says so
