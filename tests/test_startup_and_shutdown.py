"""`mds serve` as an orchestrator sees it: a start-up failure is one line and a non-zero exit; SIGTERM turns health
NOT_SERVING at once and keeps serving for MDS_DRAIN_SECONDS (a second signal ends the drain), then exits 0."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

import onnx_models
from harness import ONE, ServerProcess, deploy, outputs_of, request, serve_fails, storage_of, wait_until
from local_machine import free_port


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


def log_events(server: ServerProcess) -> list[dict]:
    return [json.loads(line) for line in (server.log_dir / "mds.log").read_text().splitlines()]


def cache_events(metrics_port: int) -> dict[str, float]:
    text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    prefix = 'mds_model_cache_events_total{event="'
    return {
        line[len(prefix) :].split('"')[0]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


def test_a_restart_loads_the_models_last_used_in_the_background_most_recent_first(tmp_path):
    """The versions loaded at the last stop load again at start, most recently used first, before any request
    asks; one deleted meanwhile is skipped without a word. Then a prediction is a cache hit."""
    first = ServerProcess(tmp_path).start()
    for scale, name in enumerate(("older", "newer", "dropped"), 1):
        deploy(first, name, onnx_models.add_two(float(scale)))
    for name in ("dropped", "newer", "older"):  # "older" is now the most recently used, "dropped" the least
        first.inference.Predict(request(name, {"a": ONE, "b": ONE}), timeout=30)
    assert first.stop() == 0
    assert storage_of(first).metadata.delete("dropped", 1)  # deleted while no server runs
    shutil.rmtree(first.log_dir)
    metrics_port = free_port()
    second = ServerProcess(tmp_path, mds_metrics_port=metrics_port).start()
    try:
        log = second.log_dir / "mds.log"
        wait_until(lambda: "preloading done" in log.read_text(), what="the preloading to end")
        events = log_events(second)
        preloaded = [e["model"] for e in events if e["message"] == "model preloaded"]
        assert preloaded == ["older", "newer"]
        assert not [e for e in events if e["level"] in ("WARNING", "ERROR")], events
        assert cache_events(metrics_port) == {"preload": 2}
        reply = second.inference.Predict(request("newer", {"a": ONE, "b": ONE}), timeout=30)
        assert outputs_of(reply)["z"].tolist() == [4.0]
        assert cache_events(metrics_port) == {"preload": 2, "hit": 1}
    finally:
        assert second.stop() == 0
    assert json.loads((second.data_dir / "loaded-models.json").read_text())["models"] == [
        {"name": "newer", "version": 1},
        {"name": "older", "version": 1},
    ]


def test_a_corrupt_record_of_loaded_models_is_ignored(tmp_path):
    server = ServerProcess(tmp_path, mds_preload_models="on")
    server.data_dir.mkdir(parents=True)
    (server.data_dir / "loaded-models.json").write_bytes(b"\x00{garbage")
    server.start()
    try:
        deploy(server, "adder", onnx_models.add_two())
        assert outputs_of(server.inference.Predict(request("adder", {"a": ONE, "b": ONE})))["z"].tolist() == [2.0]
        messages = [e["message"] for e in log_events(server)]
        assert "ignoring the record of the models loaded before" in messages and "preloading done" not in messages
    finally:
        assert server.stop() == 0
