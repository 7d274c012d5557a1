"""What tests share: real `mds serve` processes and the tools run against them, requests and their checks."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
import requests
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from minio import Minio

import onnx_models
from local_machine import BIN, free_port
from mds.oip import grpc_service_pb2
from mds.v1 import (
    inference_service_pb2,
    inference_service_pb2_grpc,
    job_service_pb2,
    job_service_pb2_grpc,
    model_service_pb2,
    model_service_pb2_grpc,
    tensor_pb2,
)
from mds_grpc.api.tensors import from_array, to_array
from mds_grpc.config import load_settings
from mds_grpc.storage import open_storage

REPO = Path(__file__).resolve().parents[1]
ONE = np.array([1.0], np.float32)
DENSE = onnx_models.dense()  # the classifier the job tests run
SAMPLES = {  # one array of every dtype MDS serves, with its extreme values
    "BOOL": np.array([[True, False], [False, True]]),
    "UINT8": np.array([[0, 255], [7, 8]], dtype=np.uint8),
    "UINT16": np.array([[0, 65535], [7, 8]], dtype=np.uint16),
    "UINT32": np.array([[0, 2**32 - 1], [7, 8]], dtype=np.uint32),
    "UINT64": np.array([[0, 2**64 - 1], [7, 8]], dtype=np.uint64),
    "INT8": np.array([[-128, 127], [0, 1]], dtype=np.int8),
    "INT16": np.array([[-32768, 32767], [0, 1]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 2**31 - 1], [0, 1]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 2**63 - 1], [0, 1]], dtype=np.int64),
    "FP16": np.array([[0.5, -2.0], [65504, 1e-3]], dtype=np.float16),
    "FP32": np.array([[0.5, -2.0], [3.4e38, 1e-30]], dtype=np.float32),
    "FP64": np.array([[0.5, -2.0], [1e300, 1e-300]], dtype=np.float64),
    "BF16": np.array([[0.5, -2.0], [3.0, 1e-3]], dtype=ml_dtypes.bfloat16),
    "STRING": np.array([["a", ""], ["émeu", "x" * 300]], dtype=object),
}


class WorkerProcess:
    """`python -m mds_grpc worker`: runs jobs from Redis, with the same settings as a server."""

    def __init__(self, server: "ServerProcess", name: str = "worker"):
        self.root = server.root / name
        self.root.mkdir(parents=True, exist_ok=True)
        self.stdout = open(self.root / "stdout.log", "ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mds_grpc",
                "worker",
                "--data-dir",
                str(self.root / "data"),
                "--log-dir",
                str(self.root / "logs"),
            ],
            env={**os.environ, **server.env},
            cwd=self.root,
            stdout=self.stdout,
            stderr=subprocess.STDOUT,
        )
        log = self.root / "logs" / "mds.log"
        wait_until(lambda: log.exists() and "worker started" in log.read_text(), what="the worker to start")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60) -> int:
        self.process.send_signal(signum)
        code = self.process.wait(timeout)
        self.stdout.close()
        return code


class EnvoyProcess:
    """scripts/run_envoy.py in front of servers: REST/JSON, gRPC passthrough, WebSocket and /docs/ on one port."""

    def __init__(self, *servers: "ServerProcess", cors_origins: tuple[str, ...] = (), args: tuple[str, ...] = ()):
        self.port, self.admin_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        root = servers[0].root
        self.log = open(root / f"envoy-{self.port}.log", "ab")
        upstreams = [arg for server in servers for arg in ("--upstream", f"127.0.0.1:{server.port}")]
        upstreams += [
            arg for server in servers for arg in ("--websocket-upstream", f"127.0.0.1:{server.websocket_port}")
        ]
        origins = [arg for origin in cors_origins for arg in ("--cors-origin", origin)]
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "scripts" / "run_envoy.py"),
                "--listen-port",
                str(self.port),
                "--admin-port",
                str(self.admin_port),
                *upstreams,
                *origins,
                *args,
                "--config-out",
                str(root / "envoy.yaml"),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: _answers(self.url + "/v1/models"), what="Envoy to proxy to the server")

    def stat(self, name: str) -> int:
        """A counter from Envoy's admin interface, e.g. cluster.mds.upstream_rq_retry."""
        text = requests.get(f"http://127.0.0.1:{self.admin_port}/stats", params={"filter": f"^{name}$"}).text
        return int(text.split(":")[1]) if text.strip() else 0

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
        # No drain on SIGTERM unless a test asks: nothing balances across these servers.
        self.env = {"MDS_DRAIN_SECONDS": "0", **{k.upper(): str(v) for k, v in env.items()}}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env.setdefault("MDS_WEBSOCKET_PORT", str(free_port()))
        self.websocket_port = int(self.env["MDS_WEBSOCKET_PORT"])
        self.process: subprocess.Popen | None = None

    def launch(self) -> None:
        """Start `mds serve` without waiting for it to answer."""
        self.root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        self.stdout = open(self.root / "stdout.log", "ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mds_grpc",
                "serve",
                "--grpc-port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
                "--log-dir",
                str(self.log_dir),
            ],
            env=env,
            cwd=self.root,
            stdout=self.stdout,
            stderr=subprocess.STDOUT,
        )

    def start(self, with_worker: bool = True) -> "ServerProcess":
        """Start the server (again); on Redis, with a `mds worker` of its own unless `with_worker` is off."""
        self.launch()
        self.channel = (
            grpc.secure_channel(self.address, self.credentials)
            if self.credentials
            else grpc.insecure_channel(self.address)
        )
        health = health_pb2_grpc.HealthStub(self.channel)
        reply = health.Check(
            health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=60, metadata=self.probe_metadata
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.inference = inference_service_pb2_grpc.InferenceServiceStub(self.channel)
        self.jobs = job_service_pb2_grpc.JobServiceStub(self.channel)
        self.workers = [WorkerProcess(self)] if with_worker and "MDS_REDIS_URL" in self.env else []
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
        """The SHA-256 of every stored blob, in the local folder or the S3 bucket (see storage/s3_blobs.py:
        a linked upload counts as its hash); any other object, by the last part of its key."""
        if "MDS_S3_ENDPOINT" in self.env:
            client = Minio(
                self.env["MDS_S3_ENDPOINT"], self.env["MDS_S3_ACCESS_KEY"], self.env["MDS_S3_SECRET_KEY"], secure=False
            )
            keys = [o.object_name for o in client.list_objects(self.env["MDS_S3_BUCKET"], recursive=True)]
            links = [key.split("/")[1:] for key in keys if key.startswith("links/")]
            linked = {f"uploads/{upload}" for _, upload in links}
            return sorted(
                {sha256 for sha256, _ in links}
                | {key.rsplit("/", 1)[-1] for key in keys if not key.startswith("links/") and key not in linked}
            )
        return sorted(p.name for p in (self.data_dir / "blobs").rglob("*") if p.is_file())


def backend_env(services: dict[str, str], namespace: str) -> dict[str, str]:
    """Settings for a server on MongoDB, S3 and Redis, in a database, bucket and queue of its own."""
    keys = ("MDS_MONGO_URI", "MDS_S3_ENDPOINT", "MDS_S3_ACCESS_KEY", "MDS_S3_SECRET_KEY", "MDS_REDIS_URL")
    return {
        **{k: services[k] for k in keys},
        "MDS_MONGO_DATABASE": namespace,
        "MDS_S3_BUCKET": namespace,
        "MDS_REDIS_NAMESPACE": namespace,
        "MDS_AUTH": "off",
    }  # test_auth covers keys


def mongo_s3_settings(services: dict[str, str], namespace: str) -> dict[str, str]:
    """load_settings() arguments for MongoDB and S3, in a database and bucket of their own."""
    keys = ("MDS_MONGO_URI", "MDS_S3_ENDPOINT", "MDS_S3_ACCESS_KEY", "MDS_S3_SECRET_KEY")
    return {
        **{k.removeprefix("MDS_").lower(): services[k] for k in keys},
        "mongo_database": namespace,
        "s3_bucket": namespace,
    }


def storage_of(server: ServerProcess):
    """The server's storage (metadata and blobs), opened in this process."""
    env = {
        k.removeprefix("MDS_").lower(): v
        for k, v in server.env.items()
        if k
        in (
            "MDS_MONGO_URI",
            "MDS_MONGO_DATABASE",
            "MDS_S3_ENDPOINT",
            "MDS_S3_ACCESS_KEY",
            "MDS_S3_SECRET_KEY",
            "MDS_S3_BUCKET",
        )
    }
    return open_storage(load_settings(data_dir=server.data_dir, **env))


def wait_for_health(server: ServerProcess, status) -> None:
    """Follow the health Watch stream until it reports `status`."""
    for reply in health_pb2_grpc.HealthStub(server.channel).Watch(health_pb2.HealthCheckRequest(), timeout=60):
        if reply.status == status:
            return


def mds_gc(server: ServerProcess) -> dict:
    """`mds gc` on the server's storage, with no grace period; its JSON report."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mds_grpc",
            "gc",
            "--grace-seconds",
            "-60",
            "--data-dir",
            str(server.data_dir),
            "--log-dir",
            str(server.root / "gc-logs"),
        ],
        env={**os.environ, **server.env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def mds_keys(server: ServerProcess, *args: str) -> str:
    """`mds keys ARGS` on the server's data folder; its output."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mds_grpc",
            "keys",
            *args,
            "--data-dir",
            str(server.data_dir),
            "--log-dir",
            str(server.root / "keys-logs"),
        ],
        env={**os.environ, **server.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def create_key(server, *args) -> tuple[str, str]:
    """`mds keys create ARGS`: the new key's id and secret."""
    created = json.loads(mds_keys(server, "create", *args))
    return created["id"], created["key"]


def grpcurl(*args: str) -> str:
    """grpcurl over plaintext with ARGS; its output."""
    result = subprocess.run([str(BIN / "grpcurl"), "-plaintext", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"grpcurl {args[-1]}: {result.stderr}"
    return result.stdout


def grpcurl_call(address: str, method: str, *messages: dict) -> list[dict]:
    """Call `method` with `messages` (several for client streams) through grpcurl; the replies, one per message."""
    decoder, text, replies = (
        json.JSONDecoder(),
        grpcurl("-d", " ".join(json.dumps(m) for m in messages), address, method).strip(),
        [],
    )
    while text:
        reply, end = decoder.raw_decode(text)
        replies.append(reply)
        text = text[end:].strip()
    return replies


def every_rpc() -> set[str]:
    """Every method of every service MDS serves, as "package.Service/Method"."""
    return {
        f"{service.full_name}/{method.name}"
        for module in (model_service_pb2, inference_service_pb2, job_service_pb2, grpc_service_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }


def upload_requests(
    name: str, data: bytes, chunk_size: int = 64 * 1024, side_files: dict[str, bytes] | None = None, **header
):
    """The request stream of an upload: header, main-file chunks, then side-file chunks."""
    side_files = side_files or {}
    header.setdefault("external_files", [model_service_pb2.ModelFile(path=p) for p in side_files])
    yield model_service_pb2.UploadModelRequest(header=model_service_pb2.ModelHeader(name=name, **header))
    for offset in range(0, len(data), chunk_size):
        yield model_service_pb2.UploadModelRequest(chunk=data[offset : offset + chunk_size])
    for path, content in side_files.items():
        for offset in range(0, len(content), chunk_size):
            yield model_service_pb2.UploadModelRequest(
                file_chunk=model_service_pb2.FileChunk(path=path, data=content[offset : offset + chunk_size])
            )


def upload(server, name, data, **kwargs):
    return server.models.UploadModel(upload_requests(name, data, **kwargs), timeout=120)


def deploy(server, name: str, data: bytes) -> int:
    """Upload a model; its version."""
    return upload(server, name, data).version


async def parts(data: bytes):
    """The core's upload stream of a model in one file."""
    yield "model.onnx", data


def request(name, inputs: dict, raw=True, **fields) -> inference_service_pb2.PredictRequest:
    return inference_service_pb2.PredictRequest(
        model=name, inputs=[from_array(k, v, raw) for k, v in inputs.items()], **fields
    )


def outputs_of(response: inference_service_pb2.PredictResponse) -> dict:
    return {t.name: to_array(t) for t in response.outputs}


def assert_status(call, code, *fragments):
    """`call` fails with `code` and a message holding every fragment; the message."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    for fragment in fragments:
        assert fragment in caught.value.details()
    return caught.value.details()


def watch(server, job_id) -> list[job_service_pb2.Job]:
    return list(server.jobs.WatchJob(job_service_pb2.WatchJobRequest(id=job_id), timeout=120))


def results(server, job_id) -> tuple[list[job_service_pb2.JobResultBatch], dict[str, np.ndarray]]:
    """A job's result batches, and its outputs by name over all batches."""
    batches = list(server.jobs.GetJobResults(job_service_pb2.GetJobResultsRequest(id=job_id), timeout=120))
    names = [t.name for t in batches[0].outputs]
    return batches, {n: np.concatenate([to_array(t) for b in batches for t in b.outputs if t.name == n]) for n in names}


def in_process(model: bytes, x: np.ndarray, batch_rows: int) -> dict[str, np.ndarray]:
    """onnxruntime in this process, at the job's batch size."""
    session = ort.InferenceSession(model)
    runs = [session.run(None, {"x": x[i : i + batch_rows]}) for i in range(0, len(x), batch_rows)]
    return {o.name: np.concatenate([r[k] for r in runs]) for k, o in enumerate(session.get_outputs())}


def chunked_input(x: np.ndarray, chunk_rows: int, name: str = "x"):
    """The UploadJobInput stream of X as FP32, CHUNK_ROWS rows a chunk."""
    header = job_service_pb2.JobInputHeader(
        inputs=[tensor_pb2.TensorSpec(name=name, dtype=tensor_pb2.DATA_TYPE_FP32, shape=x.shape)]
    )
    yield job_service_pb2.UploadJobInputRequest(header=header)
    for start in range(0, len(x), chunk_rows):
        chunk = job_service_pb2.JobInputChunk(inputs=[from_array(name, x[start : start + chunk_rows], raw=True)])
        yield job_service_pb2.UploadJobInputRequest(chunk=chunk)


def serve_fails(tmp_path, env: dict[str, str], *flags: str) -> list[str]:
    """The stderr lines of an `mds serve` that must fail at start."""
    result = subprocess.run(
        [sys.executable, "-m", "mds_grpc", "serve", "--data-dir", str(tmp_path / "data"), *flags],
        env={**os.environ, "MDS_LOG_DIR": str(tmp_path / "logs"), **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    return result.stderr.splitlines()


def wait_until(condition, timeout: float = 30.0, what: str = "condition"):
    """Poll `condition` until it holds; for effects of another process that sends no signal."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def edited_contract(tmp_path: Path, old: str, new: str, *protoc_flags: str) -> Path:
    """A copy of protos/ with `old` replaced by `new` in mds/v1/model_service.proto, compiled by protoc with
    `protoc_flags` (paths relative to the copy's parent may use "{out}"); the copy's parent folder."""
    protos = tmp_path / "protos"
    shutil.copytree(REPO / "protos", protos)
    model_service = protos / "mds" / "v1" / "model_service.proto"
    text = model_service.read_text()
    assert old in text, f"the contract no longer has {old!r}"
    model_service.write_text(text.replace(old, new, 1))
    googleapis = Path(status_pb2.__file__).parents[2]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{protos}",
            f"-I{googleapis}",
            *(flag.format(out=tmp_path) for flag in protoc_flags),
            *[str(p.relative_to(protos)) for p in protos.rglob("*.proto")],
        ],
        check=True,
        cwd=protos,
    )
    return tmp_path
