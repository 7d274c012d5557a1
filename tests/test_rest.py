"""REST/JSON through a real Envoy (gRPC-JSON transcoding), gRPC through the same port, and the API docs."""

import base64
import subprocess
import tempfile

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import requests

import onnx_models
from harness import ONE, EnvoyProcess, ServerProcess, create_key, outputs_of, request, upload_requests
from mds.v1 import inference_service_pb2_grpc


@pytest.fixture(scope="module")
def envoy(server):
    process = EnvoyProcess(server)
    server.models.UploadModel(upload_requests("rest-adder", onnx_models.add_two(2.0)))
    server.models.UploadModel(upload_requests("rest-adder", onnx_models.add_two(3.0)))
    yield process
    process.stop()


def test_list_and_get(envoy):
    listed = requests.get(f"{envoy.url}/v1/models", params={"name": "rest-adder"}).json()
    assert [(m["name"], m["version"]) for m in listed["models"]] == [("rest-adder", "1"), ("rest-adder", "2")]
    latest = requests.get(f"{envoy.url}/v1/models/rest-adder").json()
    pinned = requests.get(f"{envoy.url}/v1/models/rest-adder/versions/1").json()
    assert (latest["version"], pinned["version"]) == ("2", "1")
    assert [i["name"] for i in pinned["inputs"]] == ["a", "b"] and pinned["inputs"][0]["dtype"] == "DATA_TYPE_FP32"


def test_predict_with_typed_json_and_base64_raw(envoy):
    typed = {
        "inputs": [
            {"name": "a", "dtype": "DATA_TYPE_FP32", "shape": [2], "contents": {"fp32Contents": [1, 2]}},
            {"name": "b", "dtype": "DATA_TYPE_FP32", "shape": [2], "contents": {"fp32Contents": [10, 20]}},
        ]
    }
    reply = requests.post(f"{envoy.url}/v1/models/rest-adder:predict", json=typed)
    assert reply.status_code == 200, reply.text
    (output,) = reply.json()["outputs"]
    assert (output["name"], output["contents"]["fp32Contents"]) == ("z", [33, 66])

    raw = lambda values: base64.b64encode(np.array(values, "<f4").tobytes()).decode()  # noqa: E731
    pinned = {
        "inputs": [
            {"name": "a", "dtype": "DATA_TYPE_FP32", "shape": [2], "rawData": raw([1, 2])},
            {"name": "b", "dtype": "DATA_TYPE_FP32", "shape": [2], "rawData": raw([10, 20])},
        ],
        "requestId": "rest-1",
    }
    reply = requests.post(f"{envoy.url}/v1/models/rest-adder/versions/1:predict", json=pinned).json()
    assert reply["requestId"] == "rest-1" and reply["version"] == "1"
    z = np.frombuffer(base64.b64decode(reply["outputs"][0]["rawData"]), "<f4")
    assert z.tolist() == [22.0, 44.0]


def test_aliases_over_rest(envoy):
    base = f"{envoy.url}/v1/models/rest-adder/aliases"
    reply = requests.put(f"{base}/prod", json={"version": 1, "canaryVersion": 2, "canaryPercent": 0})
    assert reply.status_code == 200, reply.text
    assert (reply.json()["alias"], reply.json()["version"]) == ("prod", "1")
    inputs = [{"name": n, "dtype": "DATA_TYPE_FP32", "shape": [1], "contents": {"fp32Contents": [1]}} for n in "ab"]
    predicted = requests.post(f"{base}/prod:predict", json={"inputs": inputs}).json()
    assert predicted["version"] == "1" and predicted["outputs"][0]["contents"]["fp32Contents"] == [4]
    assert requests.get(f"{base}/prod/model").json()["version"] == "1"
    assert [a["alias"] for a in requests.get(base).json()["aliases"]] == ["prod"]
    refused = requests.delete(f"{envoy.url}/v1/models/rest-adder/versions/1")
    assert refused.status_code == 400 and "alias 'prod'" in refused.json()["message"]  # FAILED_PRECONDITION
    assert requests.delete(f"{base}/prod").json()["version"] == "1"
    history = requests.get(f"{base}/prod/history").json()["changes"]
    assert [c["action"] for c in history] == ["set", "delete"]
    assert requests.post(f"{base}/prod:predict", json={"inputs": inputs}).status_code == 404


@pytest.mark.parametrize(
    "method, path, body, status, fragment",
    [
        ("get", "/v1/models/no-such-model", None, 404, "'no-such-model' does not exist"),
        ("get", "/v1/models/rest-adder/versions/9", None, 404, "version 9 does not exist"),
        (
            "post",
            "/v1/models/rest-adder:predict",
            {"inputs": [{"name": "a", "dtype": "DATA_TYPE_FP32", "shape": [1], "contents": {"fp32Contents": [1]}}]},
            400,
            "missing input 'b'",
        ),
        ("get", "/v1/models?pageToken=garbage!", None, 400, "malformed page_token"),
        ("get", "/v1/jobs/no-such-job", None, 404, "job 'no-such-job' does not exist"),
    ],
)
def test_errors_become_http_statuses_with_a_json_body(envoy, method, path, body, status, fragment):
    reply = getattr(requests, method)(envoy.url + path, json=body)
    assert reply.status_code == status
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()
    assert fragment in error["message"] and error["code"] in (3, 5)


def test_upload_over_rest(envoy, server, tmp_path):
    data = onnx_models.dense()
    messages = [{"header": {"name": "rest-upload", "labels": {"via": "rest"}}}] + [
        {"chunk": base64.b64encode(data[i : i + 200]).decode()} for i in range(0, len(data), 200)
    ]
    reply = requests.post(f"{envoy.url}/v1/models", json=messages)
    assert reply.status_code == 200, reply.text
    model = reply.json()
    assert (model["name"], model["version"], model["labels"]) == ("rest-upload", "1", {"via": "rest"})
    x = np.ones((2, 8), np.float32)
    want = ort.InferenceSession(data).run(["scores"], {"x": x})[0]
    body = {
        "inputs": [
            {"name": "x", "dtype": "DATA_TYPE_FP32", "shape": [2, 8], "contents": {"fp32Contents": x.ravel().tolist()}}
        ],
        "outputNames": ["scores"],
    }
    scores = requests.post(f"{envoy.url}/v1/models/rest-upload:predict", json=body).json()["outputs"][0]
    np.testing.assert_array_equal(np.array(scores["contents"]["fp32Contents"], np.float32).reshape(2, 3), want)
    assert requests.delete(f"{envoy.url}/v1/models/rest-upload").json()["deletedVersions"] == ["1"]


def test_jobs_over_rest(envoy):
    x = np.arange(12, dtype=np.float32).tolist()
    job = requests.post(
        f"{envoy.url}/v1/jobs",
        json={
            "model": "rest-adder",
            "batchRows": 4,
            "inputs": [
                {"name": "a", "dtype": "DATA_TYPE_FP32", "shape": [12], "contents": {"fp32Contents": x}},
                {"name": "b", "dtype": "DATA_TYPE_FP32", "shape": [12], "contents": {"fp32Contents": x}},
            ],
        },
    ).json()
    assert job["state"] == "JOB_STATE_QUEUED" and job["rowsTotal"] == "12"
    updates = requests.get(f"{envoy.url}/v1/jobs/{job['id']}:watch").json()  # a JSON array, sent when done
    assert updates[-1]["state"] == "JOB_STATE_SUCCEEDED"
    batches = requests.get(f"{envoy.url}/v1/jobs/{job['id']}/results").json()
    assert sum(int(b["rows"]) for b in batches) == 12 and batches[0].get("rowOffset", "0") == "0"
    z = np.concatenate([np.frombuffer(base64.b64decode(b["outputs"][0]["rawData"]), "<f4") for b in batches])
    assert z.tolist() == [3.0 * 2 * v for v in x]


def test_grpc_passes_through_the_same_port(envoy):
    channel = grpc.insecure_channel(f"127.0.0.1:{envoy.port}")
    reply = inference_service_pb2_grpc.InferenceServiceStub(channel).Predict(
        request("rest-adder", {"a": ONE, "b": ONE}, version=1)
    )
    assert outputs_of(reply)["z"].tolist() == [4.0]


def test_openapi_document_lists_every_rest_route(envoy):
    document = requests.get(f"{envoy.url}/docs/openapi.json").json()
    assert {
        "/v1/models",
        "/v1/models/{name}",
        "/v1/models/{name}/versions/{version}",
        "/v1/models/{model}:predict",
        "/v1/models/{model}/versions/{version}:predict",
        "/v1/jobs",
        "/v1/jobs/{id}",
    } <= set(document["paths"])


def test_swagger_page_lists_the_operations_in_a_browser(envoy):
    with tempfile.TemporaryDirectory() as profile:
        page = subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=30000",
                "--dump-dom",
                f"{envoy.url}/docs/",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    operations = [
        (path, method)
        for path, methods in requests.get(f"{envoy.url}/docs/openapi.json").json()["paths"].items()
        for method in methods
    ]
    assert len(operations) == 22
    assert page.count('class="opblock-summary-path"') == len(operations)
    for path, _ in operations:
        assert f'data-path="{path}"' in page


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("small"), mds_max_model_bytes=100).start()
    envoy = EnvoyProcess(server)
    yield envoy
    envoy.stop()
    assert server.stop() == 0


def test_resource_exhausted_becomes_429(small_server):
    data = onnx_models.dense()
    messages = [{"header": {"name": "too-big"}}, {"chunk": base64.b64encode(data).decode()}]
    reply = requests.post(f"{small_server.url}/v1/models", json=messages)
    assert reply.status_code == 429 and "model size limit of 100 bytes" in reply.json()["message"]


def test_api_keys_over_rest(tmp_path):
    """The Authorization header reaches the server as gRPC metadata: 401 without a valid key, 403 out of scope."""
    server = ServerProcess(tmp_path, mds_auth="on")
    _, admin = create_key(server, "--scope", "admin")  # keys live in the data folder: made before the start
    _, limited = create_key(server, "--scope", "predict", "--prefix", "pub-")
    server.start()
    envoy = EnvoyProcess(server)
    try:
        server.models.UploadModel(
            upload_requests("pub-adder", onnx_models.add_two()), metadata=(("authorization", f"Bearer {admin}"),)
        )
        url = f"{envoy.url}/v1/models/pub-adder"
        bearer = lambda key: {"Authorization": f"Bearer {key}"}  # noqa: E731
        for headers in ({}, bearer("mds_0000000000000000_wrong")):
            reply = requests.get(url, headers=headers)
            assert reply.status_code == 401 and "API key" in reply.json()["message"], reply.text
        assert requests.get(url, headers=bearer(limited)).json()["name"] == "pub-adder"
        denied = requests.delete(url, headers=bearer(limited))
        assert denied.status_code == 403 and "admin" in denied.json()["message"], denied.text
        assert requests.get(f"{envoy.url}/v1/models", headers=bearer(limited)).status_code == 403
        assert requests.delete(url, headers=bearer(admin)).json()["deletedVersions"] == ["1"]
    finally:
        envoy.stop()
        assert server.stop() == 0
