"""mds_grpc.client, the Python client library, against a real server."""

import subprocess
import sys

import grpc
import numpy as np
import onnxruntime as ort
import pytest

import onnx_models
from harness import DENSE, SAMPLES, ServerProcess, create_key, free_port, in_process
from mds_grpc.client import (
    Client,
    FailedPrecondition,
    InvalidArgument,
    JobState,
    MdsError,
    NotFound,
    PermissionDenied,
    Prediction,
    Unauthenticated,
    Unavailable,
)


@pytest.fixture
def client(server):
    with Client(server.address) as client:
        yield client


def test_importing_the_client_loads_neither_onnxruntime_nor_the_server():
    code = (
        "import sys, mds_grpc.client; "
        "print(sorted({'onnxruntime', 'mds_grpc.server', 'mds_grpc.core.registry'} & set(sys.modules)))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert loaded.stdout.strip() == "[]"


def test_upload_reports_progress_and_sends_external_data(client, unique, tmp_path):
    path = onnx_models.save_with_external_data(tmp_path)
    total = path.stat().st_size + (tmp_path / "model.onnx.data").stat().st_size
    progress = []
    model = client.upload(
        path,
        unique,
        description="matmul",
        labels={"team": "ml"},
        metadata={"owner": "me"},
        progress=lambda sent, of: progress.append((sent, of)),
    )
    assert (model.version, model.description, dict(model.labels)) == (1, "matmul", {"team": "ml"})
    assert [f.path for f in model.files] == ["model.onnx", "model.onnx.data"]
    assert progress[0] == (0, total) and progress[-1] == (total, total)
    assert [sent for sent, _ in progress] == sorted(sent for sent, _ in progress)
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    [want] = ort.InferenceSession(str(path)).run(None, {"x": x})
    np.testing.assert_allclose(client.predict(unique, {"x": x}).outputs["y"], want, rtol=1e-5)


@pytest.mark.parametrize("names", [[n for n in SAMPLES if n != "BF16"], [n for n in SAMPLES if n != "STRING"]])
def test_predict_takes_and_returns_numpy_arrays_of_every_dtype(client, unique, names):
    client.upload(onnx_models.identity_all_dtypes(names), unique)
    prediction = client.predict(unique, {f"x_{name}": SAMPLES[name] for name in names})
    assert (prediction.model, prediction.version) == (unique, 1)
    assert list(prediction.outputs) == [f"y_{name}" for name in names]
    for name in names:
        got = prediction.outputs[f"y_{name}"]
        assert got.dtype == SAMPLES[name].dtype and got.tolist() == SAMPLES[name].tolist(), name
    only = client.predict(unique, {f"x_{name}": SAMPLES[name] for name in names}, outputs=["y_INT8"])
    assert list(only.outputs) == ["y_INT8"]


def test_string_inputs_and_structured_outputs(client, unique):
    client.upload(onnx_models.string_labels(), unique)
    ids = client.predict(unique, {"text": np.array(["dog", "émeu", "yak"])}).outputs["id"]
    assert ids.tolist() == [2, 3, -1]
    client.upload(onnx_models.sklearn_classifier(), unique)
    prediction = client.predict(unique, {"X": np.ones((2, 4), np.float32)})
    assert prediction.version == 2 and prediction.outputs["output_label"].shape == (2,)
    assert len(prediction.structured_outputs["output_probability"]) == 2


def test_stream_yields_a_typed_error_in_place_of_a_failed_request(client, unique):
    client.upload(onnx_models.add_two(), unique)
    one = np.array([1.0], np.float32)
    inputs = [
        {"a": np.array([i], np.float32)} if i == 3 else {"a": np.array([i], np.float32), "b": one} for i in range(8)
    ]
    results = list(client.stream(unique, iter(inputs)))
    assert len(results) == 8 and isinstance(results[3], InvalidArgument)
    assert results[3].status == "INVALID_ARGUMENT" and "missing input 'b'" in str(results[3])
    for i, result in enumerate(results):
        assert i == 3 or isinstance(result, Prediction) and result.outputs["z"].tolist() == [i + 1.0]


def test_a_job_from_upload_to_results(client, unique):
    client.upload(DENSE, unique)
    x = np.random.default_rng(2).standard_normal((1000, 8)).astype(np.float32)
    job = client.create_job(unique, {"x": x}, batch_rows=128, chunk_rows=300)
    assert (job.state, job.rows_total, job.batch_rows) == (JobState.JOB_STATE_QUEUED, 1000, 128)
    *_, ended = client.watch_job(job.id)
    assert (ended.state, ended.rows_done) == (JobState.JOB_STATE_SUCCEEDED, 1000)
    assert client.get_job(job.id).state == JobState.JOB_STATE_SUCCEEDED
    assert [j.id for j in client.list_jobs(model=unique, state=JobState.JOB_STATE_SUCCEEDED)] == [job.id]
    got = {"scores": np.zeros((1000, 3), np.float32), "label": np.zeros(1000, np.int64)}
    for batch in client.job_results(job.id):
        for name, array in batch.outputs.items():
            got[name][batch.row_offset : batch.row_offset + batch.rows] = array
    for name, want in in_process(DENSE, x, 128).items():
        np.testing.assert_array_equal(got[name], want)
    with pytest.raises(FailedPrecondition, match="finished|SUCCEEDED"):
        client.cancel_job(job.id)


def test_models_get_list_delete(client, unique):
    client.upload(onnx_models.add_two(1.0), unique)
    client.upload(onnx_models.add_two(2.0), unique)
    assert client.get_model(unique).version == 2
    assert [m.version for m in client.list_models(unique)] == [1, 2]
    assert list(client.delete_model(unique, 1).deleted_versions) == [1]
    assert [m.version for m in client.list_models(unique)] == [2]
    assert list(client.delete_model(unique).deleted_versions) == [2]


def test_failures_raise_typed_errors_that_carry_the_status(client, unique):
    with pytest.raises(NotFound) as missing:
        client.get_model(unique)
    assert missing.value.status == "NOT_FOUND" and str(missing.value) == f"model '{unique}' does not exist"
    assert isinstance(missing.value, MdsError) and isinstance(missing.value.__cause__, grpc.RpcError)
    with pytest.raises(NotFound):
        client.predict(unique, {"x": np.ones(1, np.float32)})
    with pytest.raises(NotFound):
        next(client.watch_job("no-such-job"))
    with pytest.raises(InvalidArgument, match="ONNX"):
        client.upload(b"not a model", unique)
    client.upload(onnx_models.add_two(), unique)
    with pytest.raises(InvalidArgument, match="missing input 'b'"):
        client.predict(unique, {"a": np.ones(1, np.float32)})
    with pytest.raises(FileNotFoundError):
        client.upload("/nonexistent/model.onnx", unique)
    with Client(f"127.0.0.1:{free_port()}") as nobody, pytest.raises(Unavailable):
        nobody.get_model(unique)


def test_api_key_is_sent_with_every_call(tmp_path):
    server = ServerProcess(tmp_path, mds_auth="on").start()
    try:
        _, admin = create_key(server, "--scope", "admin")
        _, predictor = create_key(server, "--scope", "predict")
        with Client(server.address, api_key=admin) as client:
            client.upload(onnx_models.add_two(), "adder")
            one = {"a": np.ones(1, np.float32), "b": np.ones(1, np.float32)}
            assert [p.outputs["z"].tolist() for p in client.stream("adder", [one, one])] == [[2.0], [2.0]]
        with Client(server.address, api_key=predictor) as client:
            assert client.predict("adder", one).outputs["z"].tolist() == [2.0]
            with pytest.raises(PermissionDenied):
                client.delete_model("adder")
        with Client(server.address) as client, pytest.raises(Unauthenticated):
            list(client.list_models())
    finally:
        assert server.stop() == 0
