"""PredictStream over a WebSocket through Envoy (/v1/predictions:ws): replies in order with per-message errors, in
proto JSON and binary protobuf, API keys from a header or a subprotocol, deadlines and the in-flight bound; from
Python (the websockets client) and from a page in headless Chromium."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from google.protobuf import json_format
from prometheus_client.parser import text_string_to_metric_families
from websockets import Subprotocol
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

import onnx_models
from harness import EnvoyProcess, ServerProcess, create_key, request, upload_requests, wait_until
from local_machine import free_port
from mds.v1 import inference_service_pb2 as pb
from mds.v1 import model_service_pb2

TESTS = Path(__file__).parent
PATH = "/v1/predictions:ws"
ADDER = "ws-adder"  # z = a + b
BATCHED = "ws-batched"  # batches requests, waiting up to half a second for company
IN_FLIGHT = 2
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A server with API keys on, PredictStream's in-flight bound at 2 and messages up to 1 MiB, behind Envoy."""
    metrics_port = free_port()
    server = ServerProcess(
        tmp_path_factory.mktemp("websocket"),
        mds_auth="on",
        mds_stream_max_in_flight=IN_FLIGHT,
        mds_metrics_port=metrics_port,
        mds_max_message_bytes=2**20,
    )
    keys = {
        "admin": create_key(server, "--scope", "admin")[1],
        "limited": create_key(server, "--scope", "predict", "--prefix", "ws-")[1],
    }
    server.start()
    admin = [("authorization", f"Bearer {keys['admin']}")]
    server.models.UploadModel(upload_requests(ADDER, onnx_models.add_two()), timeout=120, metadata=admin)
    batching = model_service_pb2.Batching(max_batch_size=64, max_queue_delay_us=500_000)
    server.models.UploadModel(
        upload_requests(BATCHED, onnx_models.dense(), batching=batching), timeout=120, metadata=admin
    )
    envoy = EnvoyProcess(server)
    yield {
        "url": f"ws://127.0.0.1:{envoy.port}{PATH}",
        "direct": f"ws://127.0.0.1:{server.websocket_port}",
        "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
        "keys": keys,
        "server": server,
    }
    envoy.stop()
    assert server.stop() == 0


def json_request(i: int, model: str = ADDER) -> str:
    tensor = {"dtype": "DATA_TYPE_FP32", "shape": [1], "contents": {"fp32Contents": [i]}}
    inputs = [{"name": "a", **tensor}, {"name": "b", **tensor, "contents": {"fp32Contents": [1]}}]
    return json.dumps({"model": model, "inputs": inputs, "requestId": f"r{i}"})


async def exchange(url: str, frames: list, key: str | None = None, subprotocols=None) -> tuple[str | None, list]:
    """Send every frame while reading the replies (one per frame); the chosen subprotocol and the replies."""
    headers = {"authorization": f"Bearer {key}"} if key else None
    async with connect(url, additional_headers=headers, subprotocols=subprotocols, max_size=2**24) as ws:

        async def send():
            for frame in frames:
                await ws.send(frame)

        sender = asyncio.ensure_future(send())
        replies = [await ws.recv() for _ in frames]
        await sender
        return ws.subprotocol, replies


def parsed(replies: list) -> list[pb.PredictStreamResponse]:
    return [
        json_format.Parse(r, pb.PredictStreamResponse())
        if isinstance(r, str)
        else pb.PredictStreamResponse.FromString(r)
        for r in replies
    ]


def z_of(reply: pb.PredictStreamResponse) -> list[float]:
    (tensor,) = reply.response.outputs
    if tensor.raw_data:
        return np.frombuffer(tensor.raw_data, np.float32).tolist()
    return list(tensor.contents.fp32_contents)


def test_a_thousand_json_requests_come_back_in_order_with_per_message_errors(site):
    frames = [json_request(i) for i in range(1000)]
    frames[400] = json.dumps({"model": ADDER, "inputs": [], "requestId": "no-inputs"})
    frames[700] = "{not json"
    subprotocol, replies = asyncio.run(exchange(site["url"], frames, site["keys"]["admin"], ["mds.v1.json"]))
    assert subprotocol == "mds.v1.json" and all(isinstance(r, str) for r in replies)
    replies = parsed(replies)
    assert [r.request_id for r in replies] == [{400: "no-inputs", 700: ""}.get(i, f"r{i}") for i in range(1000)]
    assert replies[400].error.code == INVALID_ARGUMENT and "missing input" in replies[400].error.message
    assert replies[700].error.code == INVALID_ARGUMENT
    assert "message 701 is not a PredictRequest in proto JSON" in replies[700].error.message
    for i, reply in enumerate(replies):
        if i not in (400, 700):
            assert z_of(reply) == [i + 1.0], i


def test_binary_frames_with_the_proto_subprotocol(site):
    frames = [
        request(
            ADDER, {"a": np.array([i], np.float32), "b": np.ones(1, np.float32)}, request_id=str(i)
        ).SerializeToString()
        for i in range(100)
    ]
    frames[50] = b"\xff\xff\xff"
    subprotocol, replies = asyncio.run(exchange(site["url"], frames, site["keys"]["admin"], ["mds.v1.proto"]))
    assert subprotocol == "mds.v1.proto" and all(isinstance(r, bytes) for r in replies)
    replies = parsed(replies)
    assert replies[50].error.code == INVALID_ARGUMENT
    assert "message 51 is not a PredictRequest in protobuf" in replies[50].error.message
    assert [z_of(r) for i, r in enumerate(replies) if i != 50] == [[i + 1.0] for i in range(100) if i != 50]


def closed_with(url: str, key: str | None = None, subprotocols=None, frames=None) -> tuple[int, str]:
    """The close code and reason of a connection the server closes."""
    with pytest.raises(ConnectionClosedError) as closed:
        asyncio.run(exchange(url, frames or [json_request(1)], key, subprotocols))
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


def test_api_keys_come_in_a_header_or_a_subprotocol(site):
    keys = site["keys"]
    code, reason = closed_with(site["url"])
    assert code == 4000 + grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert "missing API key" in reason and "mds.v1.bearer.<key>" in reason
    assert closed_with(site["url"], keys["admin"][:-2] + "xx") == (4016, "invalid or revoked API key")
    # A browser cannot set headers: it offers the key as a subprotocol, which is never the one chosen.
    subprotocol, replies = asyncio.run(
        exchange(site["url"], [json_request(2)], subprotocols=["mds.v1.json", f"mds.v1.bearer.{keys['limited']}"])
    )
    assert subprotocol == "mds.v1.json" and z_of(parsed(replies)[0]) == [3.0]
    # A key limited to models starting with "ws-": other models fail message by message.
    _, replies = asyncio.run(exchange(site["url"], [json_request(1, "other"), json_request(3)], keys["limited"]))
    denied, allowed = parsed(replies)
    assert (
        denied.error.code == grpc.StatusCode.PERMISSION_DENIED.value[0] and "may not use model" in denied.error.message
    )
    assert z_of(allowed) == [4.0]


def test_deadlines_come_from_the_timeout_parameter(site):
    key = site["keys"]["admin"]
    _, replies = asyncio.run(exchange(site["url"] + "?timeout=1e-9", [json_request(1)], key))
    (reply,) = parsed(replies)
    assert reply.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    _, replies = asyncio.run(exchange(site["url"] + "?timeout=30", [json_request(1)], key))
    assert z_of(parsed(replies)[0]) == [2.0]
    code, reason = closed_with(site["url"] + "?timeout=soon", key)
    assert (code, reason) == (4003, "timeout must be a positive number of seconds, got 'soon'")


def batch_rows(metrics_url: str) -> dict[str, float]:
    """BATCHED's batch-size histogram: runs, rows, and runs of at most IN_FLIGHT rows."""
    text = requests.get(metrics_url, timeout=10).text
    (family,) = (f for f in text_string_to_metric_families(text) if f.name == "mds_inference_batch_rows")
    samples = [s for s in family.samples if s.labels["model"] == BATCHED]
    value = {(s.name, s.labels.get("le")): s.value for s in samples}
    return {
        "count": value["mds_inference_batch_rows_count", None],
        "sum": value["mds_inference_batch_rows_sum", None],
        "small": value["mds_inference_batch_rows_bucket", f"{IN_FLIGHT}.0"],
    }


def test_no_more_requests_run_at_once_than_the_in_flight_bound(site):
    """The batching model waits up to half a second for company: it only ever finds IN_FLIGHT requests."""
    x = np.ones((1, 8), np.float32)
    frames = [request(BATCHED, {"x": x}, request_id=str(i)).SerializeToString() for i in range(8)]
    _, replies = asyncio.run(exchange(site["url"], frames, site["keys"]["admin"]))
    assert not any(r.HasField("error") for r in parsed(replies))
    rows = batch_rows(site["metrics"])
    assert rows["sum"] == 8 and rows["small"] == rows["count"]


def test_the_websocket_port_serves_only_the_streaming_path(site):
    with pytest.raises(InvalidStatus) as refused:
        asyncio.run(exchange(site["direct"] + "/elsewhere", [json_request(1)], site["keys"]["admin"]))
    assert refused.value.response.status_code == 404


def test_a_busy_websocket_port_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "mds_grpc", "serve", "--grpc-port", "0", "--data-dir", str(tmp_path / "data")],
            env={**os.environ, "MDS_LOG_DIR": str(tmp_path / "logs"), "MDS_WEBSOCKET_PORT": str(port)},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port} (MDS_GRPC_HOST, MDS_WEBSOCKET_PORT): Address already in use"
    ]


def test_a_page_in_chromium_streams_a_thousand_requests(site):
    env = {"MDS_WS_URL": site["url"], "MDS_KEY": site["keys"]["limited"], "MDS_MODEL_NAME": ADDER}
    result = subprocess.run(
        ["node", "--test", "websocket.test.mjs"],
        cwd=TESTS / "browser",
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_serving_processes_share_the_websocket_port(tmp_path):
    server = ServerProcess(tmp_path, mds_processes=2).start()
    try:
        server.models.UploadModel(upload_requests(ADDER, onnx_models.add_two()), timeout=120)
        for i in range(24):  # each connection goes to either process
            _, replies = asyncio.run(exchange(f"ws://127.0.0.1:{server.websocket_port}{PATH}", [json_request(i)]))
            assert z_of(parsed(replies)[0]) == [i + 1.0]
        wait_until(
            lambda: sum(websocket_lines(server.log_dir / f"mds-{p}.log") for p in range(2)) == 24,
            what="24 access lines",
        )
        served = [websocket_lines(server.log_dir / f"mds-{process}.log") for process in range(2)]
        assert all(served), served
    finally:
        assert server.stop() == 0


def websocket_lines(log: Path) -> int:
    """Access lines of WebSocket connections in a log file."""
    return sum(1 for e in map(json.loads, log.read_text().splitlines()) if e.get("transport") == "websocket")


def test_hostile_frames_are_answered_and_the_connection_goes_on(site):
    hostile = ["[" * 100_000, '{"inputs": 5}', '{"model": 1}', '"x"', "null", b"\x0a" * 5, b"\x08" + b"\x80" * 10]
    _, replies = asyncio.run(exchange(site["url"], [*hostile, json_request(1)], site["keys"]["admin"]))
    *refused, answered = parsed(replies)
    assert [r.error.code for r in refused] == [INVALID_ARGUMENT] * len(hostile)
    assert z_of(answered) == [2.0]


def test_a_frame_over_the_message_limit_closes_the_connection(site):
    code, _ = closed_with(site["url"], site["keys"]["admin"], frames=[json_request(1), "x" * (2**20 + 1)])
    assert code == 1009


def test_big_json_is_read_and_written_off_the_event_loop(site):
    """A request of 32,768 numbers (over 2 KiB of JSON) and its reply are converted in a thread."""
    a = list(range(2**15))
    frame = json.dumps({"model": ADDER, "inputs": [tensor_json("a", a), tensor_json("b", [1])], "requestId": "big"})
    _, replies = asyncio.run(exchange(site["url"], [frame, json_request(1)], site["keys"]["admin"]))
    big, small = parsed(replies)
    assert z_of(big) == [x + 1.0 for x in a] and z_of(small) == [2.0]


def tensor_json(name: str, values: list) -> dict:
    return {"name": name, "dtype": "DATA_TYPE_FP32", "shape": [len(values)], "contents": {"fp32Contents": values}}


def test_a_text_frame_over_4_mib_is_refused_and_the_connection_goes_on(tmp_path):
    server = ServerProcess(tmp_path).start()  # messages up to 64 MiB
    try:
        server.models.UploadModel(upload_requests(ADDER, onnx_models.add_two()), timeout=120)
        padded = json.dumps({"model": ADDER, "requestId": "x" * (4 * 2**20)})
        _, replies = asyncio.run(exchange(f"ws://127.0.0.1:{server.websocket_port}{PATH}", [padded, json_request(1)]))
        refused, answered = parsed(replies)
        assert refused.error.code == INVALID_ARGUMENT
        assert f"message 1 is {len(padded)} characters of proto JSON" in refused.error.message
        assert "binary frames (subprotocol mds.v1.proto)" in refused.error.message
        assert z_of(answered) == [2.0]
    finally:
        assert server.stop() == 0


def access_lines(server: ServerProcess) -> list[dict]:
    """The server's access lines of WebSocket connections."""
    lines = map(json.loads, (server.log_dir / "mds.log").read_text().splitlines())
    return [e for e in lines if e.get("transport") == "websocket"]


def test_a_connection_cut_off_at_shutdown_is_logged_with_its_counts(tmp_path):
    """Its client reads nothing, so the server's replies back up: after the grace period its requests are
    cancelled, the connection is cut, and its access line still counts the replies it had."""
    server = ServerProcess(tmp_path, mds_shutdown_grace_seconds=0.5).start()
    server.models.UploadModel(upload_requests(ADDER, onnx_models.add_two()), timeout=120)
    a = np.ones(2**21, np.float32)  # 8 MiB requests and replies: ten are more than the sockets buffer
    frames = [request(ADDER, {"a": a, "b": np.ones(1, np.float32)}).SerializeToString() for _ in range(10)]

    async def stall():
        url = f"ws://127.0.0.1:{server.websocket_port}{PATH}"
        async with connect(url, subprotocols=[Subprotocol("mds.v1.proto")], max_size=2**24, max_queue=1) as ws:
            for frame in frames:  # the server reads them all: 8 in flight, 2 buffered
                await ws.send(frame)
            return await asyncio.to_thread(server.stop)

    assert asyncio.run(stall()) == 0
    (line,) = access_lines(server)
    assert line["code"] == "CANCELLED" and line["messages"] >= 1 and line["errors"] == 0, line


def test_envoy_opens_no_websocket_to_a_draining_server(tmp_path):
    """GET /health on the WebSocket port follows gRPC health; a draining server's open connections go on."""
    draining = ServerProcess(tmp_path / "draining", mds_drain_seconds=120).start()
    serving = ServerProcess(tmp_path / "serving").start()
    envoy = EnvoyProcess(draining, serving)
    try:
        for server in (draining, serving):
            server.models.UploadModel(upload_requests(ADDER, onnx_models.add_two()), timeout=120)
        wait_until(lambda: envoy.stat("cluster.mds_websocket.membership_healthy") == 2, what="both servers healthy")
        health = f"http://127.0.0.1:{draining.websocket_port}/health"
        answer = requests.get(health, timeout=10)
        assert (answer.status_code, answer.text) == (200, "SERVING\n")

        async def drain():
            async with connect(f"ws://127.0.0.1:{draining.websocket_port}{PATH}") as ws:
                draining.process.send_signal(signal.SIGTERM)
                await asyncio.to_thread(
                    wait_until, lambda: requests.get(health, timeout=10).status_code == 503, what="503 from /health"
                )
                await ws.send(json_request(1))  # an open connection is served through the drain
                return parsed([await ws.recv()])

        assert z_of(asyncio.run(drain())[0]) == [2.0]
        assert requests.get(health, timeout=10).text == "NOT_SERVING\n"
        wait_until(lambda: envoy.stat("cluster.mds_websocket.membership_healthy") == 1, what="Envoy to see the drain")
        for i in range(10):
            _, replies = asyncio.run(exchange(f"ws://127.0.0.1:{envoy.port}{PATH}", [json_request(i)]))
            assert z_of(parsed(replies)[0]) == [i + 1.0]
        wait_until(lambda: len(access_lines(serving)) == 10, what="10 access lines")
        wait_until(lambda: len(access_lines(draining)) == 1, what="the open connection's access line")
    finally:
        envoy.stop()
        assert serving.stop() == 0
        assert draining.stop(signal.SIGINT) == 0  # no drain, or the end of one
