"""`mds serve --model-dir DIR [--model-name NAME]`: the folder's models served from the start, a version per content."""

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import onnx_models
from harness import ONE, ServerProcess, backend_env, outputs_of, request
from mds.v1 import model_service_pb2


@pytest.fixture(params=["embedded", "mongo-s3"])
def stores(request) -> dict[str, str]:
    """Settings of the stores a test's servers share: the embedded default, or MongoDB and MinIO."""
    if request.param == "embedded":
        return {}
    env = backend_env(request.getfixturevalue("services"), f"mds-model-dir-{uuid.uuid4().hex[:12]}")
    return {k: v for k, v in env.items() if k not in ("MDS_REDIS_URL", "MDS_REDIS_NAMESPACE")}


def versions(server: ServerProcess) -> dict[str, list[int]]:
    listed = server.models.ListModels(model_service_pb2.ListModelsRequest(), timeout=30).models
    found: dict[str, list[int]] = {}
    for model in listed:
        found.setdefault(model.name, []).append(model.version)
    return found


def folder_messages(server: ServerProcess) -> list[tuple[str, str, int]]:
    """(message, model, version) of each line the server logged about its folder's models."""
    lines = map(json.loads, (server.log_dir / "mds.log").read_text().splitlines())
    return [(e["message"], e["model"], e["version"]) for e in lines if e["logger"] == "mds.model_folder"]


def predict_matmul(server: ServerProcess, name: str, model: Path) -> None:
    """The model with external data answers as onnxruntime does with the folder's files."""
    x = np.ones((2, 64), np.float32)
    want = ort.InferenceSession(str(model)).run(None, {"x": x})[0]
    got = outputs_of(server.inference.Predict(request(name, {"x": x}), timeout=60))["y"]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_a_folder_is_served_and_a_restart_adds_a_version_only_for_changed_bytes(tmp_path, stores):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "adder.onnx").write_bytes(onnx_models.add_two(2.0))
    matmul = onnx_models.save_with_external_data(folder / "matmul")
    (folder / "notes.txt").write_text("not a model: left alone")
    server = ServerProcess(tmp_path / "server", mds_model_dir=folder, **stores)

    server.start()
    try:
        assert versions(server) == {"adder": [1], "matmul": [1]}
        assert outputs_of(server.inference.Predict(request("adder", {"a": ONE, "b": ONE})))["z"].tolist() == [4.0]
        predict_matmul(server, "matmul", matmul)
    finally:
        assert server.stop() == 0
    registered = [("model from folder registered", "adder", 1), ("model from folder registered", "matmul", 1)]
    assert folder_messages(server) == registered

    server.start()  # the same bytes: nothing new
    try:
        assert versions(server) == {"adder": [1], "matmul": [1]}
        predict_matmul(server, "matmul", matmul)
    finally:
        assert server.stop() == 0
    unchanged = [("model from folder unchanged", "adder", 1), ("model from folder unchanged", "matmul", 1)]
    assert folder_messages(server) == registered + unchanged

    (folder / "adder.onnx").write_bytes(onnx_models.add_two(3.0))
    server.start()
    try:
        assert versions(server) == {"adder": [1, 2], "matmul": [1]}
        assert outputs_of(server.inference.Predict(request("adder", {"a": ONE, "b": ONE})))["z"].tolist() == [6.0]
    finally:
        assert server.stop() == 0
    assert folder_messages(server)[-2:] == [("model from folder registered", "adder", 2), unchanged[1]]


def test_model_name_names_the_only_model_for_every_process(tmp_path):
    """As KServe passes it; with --processes 2 the supervisor registers the model once for both."""
    folder = tmp_path / "mnt-models"
    (folder / "model" / "weights").mkdir(parents=True)  # external data in a subfolder
    matmul = onnx_models.save_with_external_data(folder / "model", location="weights/w.bin")
    server = ServerProcess(tmp_path / "server", mds_model_dir=folder, mds_model_name="fraud-v3", mds_processes=2)
    server.start()
    try:
        assert versions(server) == {"fraud-v3": [1]}
        predict_matmul(server, "fraud-v3", matmul)
    finally:
        assert server.stop() == 0
    assert folder_messages(server) == [("model from folder registered", "fraud-v3", 1)]


def two_models(folder: Path) -> None:
    (folder / "a.onnx").write_bytes(onnx_models.add_two())
    (folder / "b.onnx").write_bytes(onnx_models.add_two())


@pytest.mark.parametrize(
    "fill, flags, message",
    [
        (None, [], "error: cannot read the model folder '{folder}': No such file or directory"),
        (lambda folder: None, [], "error: no models in '{folder}': it needs NAME.onnx files or NAME/ folders"),
        (
            two_models,
            ["--model-name", "one"],
            "error: MDS_MODEL_NAME names the only model of the folder, but '{folder}' holds 2: a, b",
        ),
        (
            lambda folder: (folder / "notes.onnx").write_text("plain text"),
            [],
            "error: {folder}/notes.onnx: not an ONNX",
        ),
        (
            lambda folder: (folder / "Scores.onnx").write_bytes(onnx_models.add_two()),
            [],
            "error: {folder}/Scores.onnx: invalid model name 'Scores'",
        ),
    ],
    ids=["missing", "empty", "model-name-of-two", "not-onnx", "invalid-name"],
)
def test_a_folder_that_cannot_be_served_stops_the_start_with_one_line(tmp_path, fill, flags, message):
    folder = tmp_path / "models"
    if fill is not None:
        folder.mkdir()
        fill(folder)
    flags = ["--model-dir", str(folder), *flags, "--data-dir", str(tmp_path / "data"), "--log-dir", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "mds_grpc", "serve", "--grpc-port", "0", *flags], capture_output=True, text=True
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(message.format(folder=folder)), done.stderr
