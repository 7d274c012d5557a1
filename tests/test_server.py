"""The server as a process: health, reflection through grpcurl, access log, graceful shutdown."""

import json
import threading

import grpc
import numpy as np
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

import onnx_models
from harness import (
    ONE,
    ServerProcess,
    assert_status,
    deploy,
    free_port,
    grpcurl,
    outputs_of,
    request,
    upload_requests,
    wait_until,
)


@pytest.mark.parametrize("service", ["", "mds.v1.ModelService", "mds.v1.InferenceService"])
def test_health_is_serving(server, service):
    reply = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(service=service))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_grpcurl_lists_and_describes_through_reflection(server):
    services = grpcurl(server.address, "list").split()
    assert {"mds.v1.ModelService", "mds.v1.InferenceService", "grpc.health.v1.Health"} <= set(services)
    described = grpcurl(server.address, "describe", "mds.v1.InferenceService")
    assert (
        "rpc PredictStream ( stream .mds.v1.PredictRequest ) returns ( stream .mds.v1.PredictStreamResponse )"
        in described
    )
    assert "bytes_contents" in grpcurl(server.address, "describe", "mds.v1.TensorContents")


def test_grpcurl_calls_predict_and_models(server, unique):
    deploy(server, unique, onnx_models.add_two())
    body = {
        "model": unique,
        "requestId": "curl-1",
        "inputs": [
            {"name": "a", "dtype": "DATA_TYPE_FP32", "shape": [2], "contents": {"fp32Contents": [1, 2]}},
            {"name": "b", "dtype": "DATA_TYPE_FP32", "shape": [2], "contents": {"fp32Contents": [10, 20]}},
        ],
    }
    reply = json.loads(grpcurl("-d", json.dumps(body), server.address, "mds.v1.InferenceService/Predict"))
    assert reply["request_id"] == "curl-1"  # grpcurl prints proto field names
    assert reply["outputs"][0]["contents"]["fp32_contents"] == [11, 22]
    model = json.loads(grpcurl("-d", json.dumps({"name": unique}), server.address, "mds.v1.ModelService/GetModel"))
    assert model["name"] == unique and model["version"] == "1"


def test_every_rpc_writes_one_json_access_line(server, unique):
    deploy(server, unique, onnx_models.add_two())
    server.inference.Predict(request(unique, {"a": ONE, "b": ONE}, request_id="trace-me"))
    with pytest.raises(grpc.RpcError):
        server.inference.Predict(request(unique + "-missing", {"a": ONE}, request_id="trace-missing"))

    def access_lines():
        lines = (server.log_dir / "mds.log").read_text().splitlines()
        return [e for e in map(json.loads, lines) if e["logger"] == "mds.access"]

    wait_until(lambda: any(e.get("request_id") == "trace-missing" for e in access_lines()), what="the access line")
    by_id = {e.get("request_id"): e for e in access_lines()}
    ok, missing = by_id["trace-me"], by_id["trace-missing"]
    assert (ok["method"], ok["model"], ok["version"], ok["code"]) == (
        "/mds.v1.InferenceService/Predict",
        unique,
        1,
        "OK",
    )
    assert ok["duration_ms"] >= 0 and "time" in ok
    assert (missing["model"], missing["code"]) == (unique + "-missing", "NOT_FOUND")
    uploads = [e for e in access_lines() if e["method"].endswith("UploadModel") and e.get("model") == unique]
    assert [(e["version"], e["code"]) for e in uploads] == [(1, "OK")]


def test_sigterm_finishes_in_flight_streams_then_exits_zero(tmp_path):
    server = ServerProcess(tmp_path).start()
    deploy(server, "adder", onnx_models.add_two())
    replies, outgoing = [], [threading.Event(), threading.Event()]

    def requests():
        for i, ready in enumerate(outgoing):
            ready.wait(60)
            yield request("adder", {"a": np.array([i], np.float32), "b": ONE}, request_id=str(i))

    stream = server.inference.PredictStream(requests(), timeout=60)
    outgoing[0].set()
    replies.append(next(stream))
    server.process.send_signal(15)
    wait_until(lambda: "shutting down" in (server.log_dir / "mds.log").read_text(), what="the server to see SIGTERM")
    with pytest.raises(grpc.RpcError):  # no new RPCs once shutting down
        grpc.insecure_channel(server.address).unary_unary("/mds.v1.ModelService/ListModels")(b"", timeout=5)
    outgoing[1].set()  # the open stream is still served during the grace period
    replies.extend(stream)
    assert [outputs_of(r.response)["z"].tolist() for r in replies] == [[1.0], [2.0]]
    assert server.process.wait(60) == 0
    assert '"message": "stopped"' in (server.log_dir / "mds.log").read_text()


def test_restart_serves_stored_models(tmp_path):
    first = ServerProcess(tmp_path).start()
    deploy(first, "kept", onnx_models.add_two(2.0))
    assert first.stop() == 0
    second = ServerProcess(tmp_path).start()
    try:
        reply = second.inference.Predict(request("kept", {"a": ONE, "b": ONE}))
        assert outputs_of(reply)["z"].tolist() == [4.0]
        assert second.models.UploadModel(upload_requests("kept", onnx_models.add_two())).version == 2
    finally:
        assert second.stop() == 0


def test_prometheus_metrics(tmp_path):
    metrics_port = free_port()
    # Runs on the event loop never wait for a thread: MDS_INLINE_RUN_MAX_US=0 puts every run on one.
    server = ServerProcess(tmp_path, mds_metrics_port=metrics_port, mds_inline_run_max_us=0).start()
    try:
        deploy(server, "adder", onnx_models.add_two())
        for _ in range(3):
            server.inference.Predict(request("adder", {"a": ONE, "b": ONE}))
        with pytest.raises(grpc.RpcError):
            server.inference.Predict(request("missing", {"a": ONE}))
        text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    finally:
        assert server.stop() == 0
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    predict = 'method="/mds.v1.InferenceService/Predict"'
    assert samples[f'mds_requests_total{{code="OK",{predict},model="adder"}}'] == 3
    assert samples[f'mds_requests_total{{code="NOT_FOUND",{predict},model=""}}'] == 1  # failed names never label
    assert samples[f'mds_request_seconds_count{{{predict},model="adder"}}'] == 3
    assert samples['mds_inference_compute_seconds_count{model="adder",version="1"}'] == 3
    assert samples['mds_inference_queue_seconds_count{model="adder",version="1"}'] == 3
    assert samples['mds_model_cache_events_total{event="hit"}'] == 3
    assert samples['mds_jobs{state="queued"}'] == samples['mds_jobs{state="running"}'] == 0


def test_request_limits_are_configured_and_enforced_on_every_front_door(tmp_path):
    from mds.oip import grpc_service_pb2 as oip
    from mds.oip import grpc_service_pb2_grpc

    server = ServerProcess(tmp_path, mds_max_elements=4, mds_max_inputs=2).start()
    try:
        deploy(server, "adder", onnx_models.add_two())
        three = np.ones(3, np.float32)
        assert_status(
            lambda: server.inference.Predict(request("adder", {"a": three, "b": three})),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "over the limit of 4 elements (MDS_MAX_ELEMENTS)",
        )
        v2 = oip.ModelInferRequest(
            model_name="adder",
            inputs=[oip.ModelInferRequest.InferInputTensor(name=n, datatype="FP32", shape=[1]) for n in "abc"],
            raw_input_contents=[ONE.tobytes()] * 3,
        )
        assert_status(
            lambda: grpc_service_pb2_grpc.GRPCInferenceServiceStub(server.channel).ModelInfer(v2),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "3 input tensors exceed the limit of 2 (MDS_MAX_INPUTS)",
        )
        assert outputs_of(server.inference.Predict(request("adder", {"a": ONE, "b": ONE})))["z"].tolist() == [2.0]
    finally:
        assert server.stop() == 0
