"""Starting real `mds serve` processes for tests, and small client helpers."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from minio import Minio

from mds.v1 import inference_service_pb2_grpc, job_service_pb2_grpc, model_service_pb2
from mds.v1 import model_service_pb2_grpc


REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WorkerProcess:
    """`python -m mds_grpc worker`: runs jobs from Redis, with the same settings as a server."""

    def __init__(self, server: "ServerProcess", name: str = "worker"):
        self.root = server.root / name
        self.root.mkdir(parents=True, exist_ok=True)
        self.stdout = open(self.root / "stdout.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mds_grpc", "worker", "--data-dir", str(self.root / "data"),
             "--log-dir", str(self.root / "logs")],
            env={**os.environ, **server.env}, cwd=self.root, stdout=self.stdout, stderr=subprocess.STDOUT,
        )
        log = self.root / "logs" / "mds.log"
        wait_until(lambda: log.exists() and "worker started" in log.read_text(), what="the worker to start")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60) -> int:
        self.process.send_signal(signum)
        code = self.process.wait(timeout)
        self.stdout.close()
        return code


class EnvoyProcess:
    """scripts/run_envoy.py in front of a server: REST/JSON, gRPC passthrough and /docs/ on one port."""

    def __init__(self, server: "ServerProcess"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(server.root / f"envoy-{self.port}.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "run_envoy.py"), "--listen-port", str(self.port),
             "--grpc-port", str(server.port), "--config-out", str(server.root / "envoy.yaml")],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(lambda: _answers(self.url + "/v1/models"), what="Envoy to proxy to the server")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def _answers(url: str) -> bool:
    """Whether the server behind Envoy answered (with auth on, a request without a key gets 401)."""
    try:
        return requests.get(url, timeout=5).status_code in (200, 401)
    except requests.ConnectionError:
        return False


class ServerProcess:
    """`python -m mds_grpc serve` on a free port with its own data and log folders."""

    def __init__(self, root: Path, credentials: grpc.ChannelCredentials | None = None, **env):
        self.root = Path(root)
        self.credentials = credentials
        self.probe_metadata = None  # for the readiness check, when probes need a key
        self.data_dir = self.root / "data"
        self.log_dir = self.root / "logs"
        self.env = {k.upper(): str(v) for k, v in env.items()}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        self.root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        self.stdout = open(self.root / "stdout.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mds_grpc", "serve", "--grpc-port", str(self.port),
             "--data-dir", str(self.data_dir), "--log-dir", str(self.log_dir)],
            env=env, cwd=self.root, stdout=self.stdout, stderr=subprocess.STDOUT,
        )
        self.channel = (grpc.secure_channel(self.address, self.credentials) if self.credentials
                        else grpc.insecure_channel(self.address))
        health = health_pb2_grpc.HealthStub(self.channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=60,
                             metadata=self.probe_metadata)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.inference = inference_service_pb2_grpc.InferenceServiceStub(self.channel)
        self.jobs = job_service_pb2_grpc.JobServiceStub(self.channel)
        self.workers = [WorkerProcess(self)] if "MDS_REDIS_URL" in self.env else []
        return self

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60) -> int:
        for worker in self.workers:
            assert worker.stop() == 0
        self.channel.close()
        self.process.send_signal(signum)
        code = self.process.wait(timeout)
        self.stdout.close()
        return code

    def leftovers(self) -> list[Path]:
        """Files in the server's temp folder (uploads in progress or left behind)."""
        return sorted((self.data_dir / "tmp").rglob("*"))

    def blobs(self) -> list[str]:
        """The SHA-256 of every stored blob, in the local folder or the S3 bucket."""
        if "MDS_S3_ENDPOINT" in self.env:
            client = Minio(self.env["MDS_S3_ENDPOINT"], self.env["MDS_S3_ACCESS_KEY"],
                           self.env["MDS_S3_SECRET_KEY"], secure=False)
            return sorted(o.object_name.rsplit("/", 1)[-1]
                          for o in client.list_objects(self.env["MDS_S3_BUCKET"], recursive=True))
        return sorted(p.name for p in (self.data_dir / "blobs").rglob("*") if p.is_file())


def upload_requests(name: str, data: bytes, chunk_size: int = 64 * 1024, side_files: dict[str, bytes] | None = None,
                    **header):
    """The request stream of an upload: header, main-file chunks, then side-file chunks."""
    side_files = side_files or {}
    header.setdefault("external_files", [model_service_pb2.ModelFile(path=p) for p in side_files])
    yield model_service_pb2.UploadModelRequest(header=model_service_pb2.ModelHeader(name=name, **header))
    for offset in range(0, len(data), chunk_size):
        yield model_service_pb2.UploadModelRequest(chunk=data[offset:offset + chunk_size])
    for path, content in side_files.items():
        for offset in range(0, len(content), chunk_size):
            yield model_service_pb2.UploadModelRequest(
                file_chunk=model_service_pb2.FileChunk(path=path, data=content[offset:offset + chunk_size])
            )


def wait_until(condition, timeout: float = 30.0, what: str = "condition"):
    """Poll `condition` until it holds; for effects of another process that sends no signal."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
