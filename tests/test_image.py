"""The container image (Containerfile), built by scripts/image.sh and run with podman on the real MinIO, FerretDB
and Redis: a server reached through its published port and a job worker, both from the same image."""

import os
import subprocess
import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from minio import Minio

from harness import REPO, backend_env, wait_until
from local_machine import free_port
from mds_grpc.client import Client, JobState

SCRIPT = str(REPO / "scripts" / "image.sh")
# slirp4netns with allow_host_loopback: the container reaches the host's 127.0.0.1 (the backing servers) here.
HOST_LOOPBACK = "10.0.2.2"
NETWORK = "slirp4netns:allow_host_loopback=true"


@pytest.fixture(scope="module")
def podman_env() -> dict[str, str]:
    """The environment podman needs on this machine (CONTAINERS_CONF), and the image's name (IMAGE)."""
    lines = subprocess.run([SCRIPT, "env"], check=True, capture_output=True, text=True).stdout.split()
    return {**os.environ, **dict(line.split("=", 1) for line in lines)}


def podman(env: dict[str, str], *args: str) -> str:
    """podman ARGS; its output."""
    result = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"podman {' '.join(args[:2])}: {result.stderr}"
    return result.stdout.strip()


@pytest.fixture(scope="module")
def image(podman_env) -> str:
    """The image, built (or found up to date in the layer cache) by `make image`'s script."""
    subprocess.run([SCRIPT, "build"], check=True, env=podman_env, timeout=1200)
    return podman_env["IMAGE"]


@pytest.fixture(scope="module")
def settings(services) -> dict[str, str]:
    """Settings for a server and worker on the test MinIO, FerretDB and Redis, in a namespace of their own."""
    return backend_env(services, f"mds-image-{os.getpid()}-{time.time_ns()}")


def env_options(settings: dict[str, str]) -> list[str]:
    """--env options giving the settings to a container, with the host's loopback as the container sees it."""
    return [f"--env={name}={value.replace('127.0.0.1', HOST_LOOPBACK)}" for name, value in settings.items()]


def start(podman_env, *args: str) -> str:
    """A detached container on the slirp4netns network; its id."""
    return podman(podman_env, "run", "--detach", f"--network={NETWORK}", *args)


def logs(podman_env, container: str) -> str:
    """What the container wrote to stdout and stderr."""
    return subprocess.run(
        ["podman", "logs", container], env=podman_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ).stdout


def stop(podman_env, container: str) -> int:
    """SIGTERM (podman stop), then the container's exit code; the container is removed."""
    podman(podman_env, "stop", "--time=60", container)
    code = int(podman(podman_env, "inspect", "--format={{.State.ExitCode}}", container))
    podman(podman_env, "rm", "--volumes", container)
    return code


@pytest.fixture(scope="module")
def server(podman_env, image, settings):
    """`mds serve` (the image's default command) with its port published on 127.0.0.1: the container and the
    address to call."""
    port = free_port()
    container = start(podman_env, f"--publish=127.0.0.1:{port}:50051", *env_options(settings), image)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=60
            )
        except grpc.RpcError as error:
            output = logs(podman_env, container)
            podman(podman_env, "rm", "--force", "--volumes", container)
            pytest.fail(f"the server's health check failed ({error.code()}); its output:\n{output}")
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    yield container, f"127.0.0.1:{port}"
    assert stop(podman_env, container) == 0, logs(podman_env, container)


@pytest.fixture(scope="module")
def worker(podman_env, image, settings, server):
    """`mds worker` from the same image, on the same settings as the server."""
    container = start(podman_env, *env_options(settings), image, "worker")
    wait_until(lambda: "worker started" in logs(podman_env, container), what="the worker container to start")
    yield container
    assert stop(podman_env, container) == 0, logs(podman_env, container)


def magika_inputs(rows: int) -> dict[str, np.ndarray]:
    return {"bytes": np.random.default_rng(0).integers(0, 257, (rows, 2048)).astype(np.int32)}


def in_process(model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(model))
    return dict(zip((o.name for o in session.get_outputs()), session.run(None, inputs), strict=True))


@pytest.mark.timeout(1500)  # the first build: the Debian base, then the dependencies from PyPI (~2 minutes here)
def test_serves_a_real_model_through_the_published_port(server, settings, pretrained):
    _, address = server
    inputs = magika_inputs(3)
    with Client(address) as mds:
        stored = mds.upload(pretrained / "magika.onnx", "magika")
        prediction = mds.predict("magika", inputs)
    assert prediction.version == stored.version
    for name, expected in in_process(pretrained / "magika.onnx", inputs).items():
        np.testing.assert_allclose(prediction.outputs[name], expected, rtol=1e-5, atol=1e-6)
    s3 = Minio(settings["MDS_S3_ENDPOINT"], settings["MDS_S3_ACCESS_KEY"], settings["MDS_S3_SECRET_KEY"], secure=False)
    stored_blobs = {  # sha256/<sha256>, or links/<sha256>/<upload> for a streamed upload (storage/s3_blobs.py)
        o.object_name.split("/")[1] for o in s3.list_objects(settings["MDS_S3_BUCKET"], recursive=True)
    }
    assert stored.sha256 in stored_blobs  # the model went to MinIO, not into the container


def test_a_worker_from_the_same_image_runs_a_job(server, worker, pretrained):
    _, address = server
    inputs = magika_inputs(10)
    with Client(address) as mds:
        mds.upload(pretrained / "magika.onnx", "magika-job")
        job = mds.create_job("magika-job", inputs, batch_rows=4)
        assert list(mds.watch_job(job.id))[-1].state == JobState.JOB_STATE_SUCCEEDED
        batches = list(mds.job_results(job.id))
    for name, expected in in_process(pretrained / "magika.onnx", inputs).items():
        got = np.concatenate([b.outputs[name] for b in batches if name in b.outputs])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_runs_as_a_non_root_user(podman_env, server, image):
    container, _ = server
    assert podman(podman_env, "inspect", "--format={{.Config.User}}", image) == "10001:10001"
    assert podman(podman_env, "top", container, "user", "comm").split()[2:] == ["mds", "mds"]
    assert podman(podman_env, "exec", container, "id", "-u") == "10001"


def test_keeps_data_and_logs_in_volumes_and_no_build_tools(podman_env, server, image):
    container, _ = server
    volumes = podman(podman_env, "inspect", "--format={{range $path, $_ := .Config.Volumes}}{{$path}} {{end}}", image)
    assert volumes.split() == ["/var/lib/mds/data", "/var/lib/mds/logs"]
    mounts = podman(podman_env, "inspect", "--format={{range .Mounts}}{{.Destination}} {{end}}", container)
    assert sorted(mounts.split()) == ["/var/lib/mds/data", "/var/lib/mds/logs"]
    assert '"message"' in podman(podman_env, "exec", container, "head", "-n1", "/var/lib/mds/logs/mds.log")
    tools = "command -v gcc cc make pip pip3; ls -A /root/.cache 2>/dev/null; true"
    assert podman(podman_env, "exec", "--user=0", container, "sh", "-c", tools) == ""
