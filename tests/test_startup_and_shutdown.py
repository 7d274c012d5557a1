"""`mds serve` as an orchestrator sees it: a start-up failure is one line and a non-zero exit; SIGTERM turns health
NOT_SERVING at once and keeps serving for MDS_DRAIN_SECONDS (a second signal ends the drain), then exits 0."""

import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import onnx_models
from harness import ServerProcess, deploy, request, wait_until


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


@pytest.fixture
def busy_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_a_busy_port_is_one_line(tmp_path, busy_port):
    assert serve_fails(tmp_path, {}, "--grpc-port", str(busy_port)) == [
        f"error: cannot listen on 127.0.0.1:{busy_port} (MDS_GRPC_HOST, MDS_GRPC_PORT): Address already in use"
    ]


def test_a_busy_metrics_port_is_one_line(tmp_path, busy_port):
    (line,) = serve_fails(tmp_path, {"MDS_METRICS_PORT": str(busy_port)}, "--grpc-port", "0")
    assert line == f"error: cannot serve metrics on 127.0.0.1:{busy_port} (MDS_METRICS_PORT): Address already in use"


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"MDS_DATA_DIR": "/etc/hostname/data"}, "error: cannot use MDS_DATA_DIR=/etc/hostname/data: Not a directory"),
        ({"MDS_TLS_CERT_FILE": "/no/cert.pem", "MDS_TLS_KEY_FILE": "/no/key.pem"}, "error: cannot read a TLS file"),
        ({"MDS_GRPC_PORT": "fifty"}, "error: MDS_GRPC_PORT='fifty' is not a valid int"),
        ({"MDS_DRAIN_SECONDS": "soon"}, "error: MDS_DRAIN_SECONDS='soon' is not a valid float"),
    ],
)
def test_a_bad_setting_is_one_line(tmp_path, env, fragment):
    flags = () if "MDS_GRPC_PORT" in env else ("--grpc-port", "0")
    environment = {k: v for k, v in env.items() if k != "MDS_DATA_DIR"}
    if "MDS_DATA_DIR" in env:
        flags = (*flags, "--data-dir", env["MDS_DATA_DIR"])
    (line,) = serve_fails(tmp_path, environment, *flags)
    assert line.startswith(fragment)


def test_sigterm_drains_while_health_says_not_serving(tmp_path, unique):
    server = ServerProcess(tmp_path, MDS_DRAIN_SECONDS="600").start()
    deploy(server, unique, onnx_models.dense())
    health = health_pb2_grpc.HealthStub(server.channel)
    server.process.send_signal(signal.SIGTERM)
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    wait_until(lambda: health.Check(health_pb2.HealthCheckRequest()).status == not_serving, what="NOT_SERVING")
    x = {"x": np.ones((1, 8), np.float32)}
    assert server.inference.Predict(request(unique, x), timeout=30).version == 1  # still served while draining
    stream = server.inference.PredictStream(iter([request(unique, x)] * 3), timeout=30)
    assert [reply.response.version for reply in stream] == [1, 1, 1]
    server.process.send_signal(signal.SIGINT)  # a second signal ends the drain: in-flight calls finish, then exit
    assert server.process.wait(60) == 0
    server.stdout.close()
    server.channel.close()


def test_the_embedded_default_imports_no_client_it_does_not_use(tmp_path):
    """Without MDS_MONGO_URI, MDS_S3_ENDPOINT and MDS_REDIS_URL, and with MDS_WEBSOCKET_PORT=0, `mds serve`'s
    modules and its core import neither those stores' clients nor websockets, nor onnx (only uploads need it):
    a restart does not pay for them."""
    check = (
        "import sys\n"
        "from mds_grpc import cli, processes, server\n"
        "from mds_grpc.config import load_settings\n"
        "server.build_core(load_settings())\n"
        "unused = {'pymongo', 'minio', 'redis', 'dramatiq.brokers.redis', 'websockets', 'onnx'}\n"
        "print(sorted(unused & set(sys.modules)))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MDS_")}
    env |= {"MDS_DATA_DIR": str(tmp_path / "data"), "MDS_WEBSOCKET_PORT": "0"}
    result = subprocess.run(
        [sys.executable, "-c", check], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
