"""The V2 (Open Inference Protocol) endpoint, driven by tritonclient in its own process."""

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

import onnx_models
from harness import assert_status, upload_requests
from mds.oip import grpc_service_pb2 as pb
from mds.oip import grpc_service_pb2_grpc
from mds.v1 import model_service_pb2

CLIENT = Path(__file__).parent / "clients" / "triton_client.py"
RNG = np.random.default_rng(11)


def run_client(server, model: str, arrays: dict, tmp_path: Path, stream: int = 0, version: str = "") -> dict:
    np.savez(tmp_path / "inputs.npz", **arrays)
    inputs = str(tmp_path / "inputs.npz")
    result = subprocess.run(
        [sys.executable, str(CLIENT), server.address, model, inputs, "--stream", str(stream), "--version", version],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def onnxruntime_outputs(model: bytes, arrays: dict) -> dict:
    """What in-process onnxruntime gives for the inputs, by output name."""
    session = ort.InferenceSession(model)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, arrays), strict=True))


def assert_outputs(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, array in want.items():
        assert got[name]["shape"] == list(array.shape)
        np.testing.assert_array_equal(np.array(got[name]["data"], dtype=array.dtype).reshape(array.shape), array)


CASES = {
    "magika": (
        lambda models: (models / "magika.onnx").read_bytes(),
        lambda: {"bytes": RNG.integers(0, 257, (2, 2048)).astype(np.int32)},
    ),
    "strings": (
        lambda models: onnx_models.string_labels(),
        lambda: {"text": np.array(["dog", "émeu", "yak"], dtype=object)},
    ),
    "scalar": (
        lambda models: onnx_models.add_scalar(),
        lambda: {"x": np.array([1.5, -2.0], np.float32), "s": np.array(0.25, np.float32)},
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_tritonclient_metadata_unary_and_streaming(server, pretrained, unique, tmp_path, case):
    model_bytes, make_inputs = CASES[case]
    data = model_bytes(pretrained)
    server.models.UploadModel(upload_requests(unique, data))
    arrays = make_inputs()
    want = onnxruntime_outputs(data, arrays)

    report = run_client(server, unique, arrays, tmp_path, stream=5)
    assert (report["live"], report["ready"], report["model_ready"], report["unknown_model_ready"]) == (
        True,
        True,
        True,
        False,
    )
    assert report["server"]["name"] == "mds"
    metadata = report["metadata"]
    assert (metadata["name"], metadata["versions"], metadata["platform"]) == (unique, ["1"], "onnxruntime_onnx")
    assert [i["name"] for i in metadata["inputs"]] == [i.name for i in ort.InferenceSession(data).get_inputs()]
    for call in ("raw", "typed"):
        assert report[call]["model_version"] == "1"
        assert_outputs(report[call]["outputs"], want)
    assert report["missing_model_error"]["status"] == "StatusCode.NOT_FOUND"
    assert "does not exist" in report["missing_model_error"]["message"]
    stream = report["stream"]
    assert "NOT_FOUND" in stream[2]["error"] and "does not exist" in stream[2]["error"]
    for i in (0, 1, 3, 4):
        assert stream[i]["id"] == str(i)
        assert_outputs(stream[i]["outputs"], want)


def test_tritonclient_selects_a_version_through_an_alias(server, unique, tmp_path):
    """model_version "prod" reaches version 1 while version 2, the latest, is another model with other inputs."""
    scalar = onnx_models.add_scalar()
    server.models.UploadModel(upload_requests(unique, scalar))
    server.models.UploadModel(upload_requests(unique, onnx_models.string_labels()))
    server.models.SetAlias(model_service_pb2.SetAliasRequest(model=unique, alias="prod", version=1))
    arrays = CASES["scalar"][1]()
    want = onnxruntime_outputs(scalar, arrays)

    report = run_client(server, unique, arrays, tmp_path, stream=3, version="prod")
    assert (report["model_ready"], report["unknown_alias_ready"]) == (True, False)
    metadata = report["metadata"]
    assert (metadata["versions"], [i["name"] for i in metadata["inputs"]]) == (["1", "2"], ["x", "s"])
    for call in ("raw", "typed"):
        assert report[call]["model_version"] == "1"
        assert_outputs(report[call]["outputs"], want)
    for i in (0, 2):
        assert report["stream"][i]["model_version"] == "1"
        assert_outputs(report["stream"][i]["outputs"], want)
    assert report["unknown_alias_error"]["status"] == "StatusCode.NOT_FOUND"
    assert "no alias 'no-such-alias'" in report["unknown_alias_error"]["message"]


def test_magika_metadata_shapes(server, pretrained, unique):
    server.models.UploadModel(upload_requests(unique, (pretrained / "magika.onnx").read_bytes()))
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(server.channel)
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=unique))
    (tensor,) = metadata.inputs
    assert (tensor.datatype, list(tensor.shape)) == ("INT32", [-1, 2048])
    assert [(o.name, o.datatype, list(o.shape)) for o in metadata.outputs] == [("target_label", "FP32", [-1, 214])]


@pytest.mark.parametrize(
    "request_fields, code, fragment",
    [
        ({"model_version": "Latest"}, grpc.StatusCode.INVALID_ARGUMENT, "model_version must be empty (the latest)"),
        ({"model_version": "latest"}, grpc.StatusCode.NOT_FOUND, "no alias 'latest'"),
        ({"raw_input_contents": [b"", b""]}, grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents has 2 entries"),
        (
            {"inputs": [pb.ModelInferRequest.InferInputTensor(name="a", datatype="COMPLEX", shape=[1])]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown datatype 'COMPLEX'",
        ),
        (
            {
                "inputs": [pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1])],
                "raw_input_contents": [b"\x09\x00\x00\x00abc"],
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "longer than the data left",
        ),
        (
            {
                "inputs": [pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[2])],
                "raw_input_contents": [b"\x03\x00\x00\x00abc"],
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "needs 2 values",
        ),
    ],
)
def test_infer_errors(server, unique, request_fields, code, fragment):
    server.models.UploadModel(upload_requests(unique, onnx_models.string_labels()))
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(server.channel)
    request = pb.ModelInferRequest(model_name=unique, **request_fields)
    assert_status(lambda: stub.ModelInfer(request), code, fragment)
