"""Hostile models: refused with a clear status and nothing stored, or their failing runs answered; still serving."""

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import onnx_models
from harness import assert_status, deploy, outputs_of, request, upload
from mds.oip import grpc_service_pb2 as oip_pb
from mds.oip import grpc_service_pb2_grpc
from mds.v1 import model_service_pb2 as pb
from mds_grpc.api.tensors import from_array
from mds_grpc.core.errors import InvalidArgument
from mds_grpc.core.inspection import inspect_model

RUN_FAILED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED)


def peak_rss(server) -> int:
    """The server process's peak resident memory (VmHWM), in bytes."""
    with open(f"/proc/{server.process.pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


@pytest.fixture
def no_allocation(server):
    """The test leaves the server's peak memory within 256 MB of where it was (10**12 floats would not)."""
    before = peak_rss(server)
    yield
    assert peak_rss(server) - before < 256 << 20


def assert_serving(server):
    health = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("location", ["model.onnx.data", "weights/model.onnx.data"])
def test_external_data_through_a_symlink_is_refused(tmp_path, location):
    """A staged file, or the folder holding it, linked outside: refused before onnxruntime opens anything."""
    staged, outside = tmp_path / "staged", tmp_path / "outside"
    linked = location.split("/")[0]
    (staged / location).parent.mkdir(parents=True)
    path = onnx_models.save_with_external_data(staged, location)
    inspect_model(path, {location})
    outside.mkdir()
    (staged / linked).rename(outside / linked)
    (staged / linked).symlink_to(outside / linked)
    with pytest.raises(InvalidArgument, match=f"'{location}', which leads outside the model's folder through a"):
        inspect_model(path, {location})


def test_symlink_inside_the_folder_is_accepted(tmp_path):
    """Containment is judged on the real path: a link that stays inside the folder is harmless."""
    path = onnx_models.save_with_external_data(tmp_path / "staged")
    (path.parent / "model.onnx.data").rename(path.parent / "real.bin")
    (path.parent / "model.onnx.data").symlink_to("real.bin")
    session, _ = inspect_model(path, {"model.onnx.data"})
    assert [o.name for o in session.outputs] == ["y"]


@pytest.mark.usefixtures("nothing_left", "no_allocation")
@pytest.mark.parametrize(
    "model, side_files, fragment",
    [
        (onnx_models.missing_input(), {}, "Node input 'ghost' is not a graph input"),
        (onnx_models.huge_weight("raw"), {}, "declares a size of 4000000000000 bytes"),
        (onnx_models.huge_weight("empty"), {}, "declares a size of 4000000000000 bytes"),
        (onnx_models.huge_weight("constant"), {}, "declares a size of 4000000000000 bytes"),
        (onnx_models.huge_weight("external"), {"w.bin": b"\0" * 64}, "size to read: 4000000000000"),
    ],
    ids=["missing-input", "huge-raw", "huge-empty", "huge-constant", "huge-external"],
)
def test_models_onnxruntime_cannot_load(server, unique, model, side_files, fragment):
    assert_status(
        lambda: upload(server, unique, model, side_files=side_files),
        grpc.StatusCode.INVALID_ARGUMENT,
        "onnxruntime cannot load the model",
        fragment,
    )
    assert_status(lambda: server.models.GetModel(pb.GetModelRequest(name=unique)), grpc.StatusCode.NOT_FOUND)
    assert_serving(server)


@pytest.mark.usefixtures("nothing_left")
def test_load_failure_quoting_a_huge_name_fits_in_a_status(server, unique):
    """onnxruntime quotes the 20,000-character name; the message is cut short, not lost on the way to the client."""
    details = assert_status(
        lambda: upload(server, unique, onnx_models.missing_input("g" * 20_000)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "onnxruntime cannot load the model",
    )
    assert len(details) < 4000


@pytest.fixture(scope="module")
def hostile(server):
    """Models that load but fail, or would allocate without bound, at run time."""
    for name, data in [
        ("hostile-reshape", onnx_models.fails_unless_rows_divide_by_four()),
        ("hostile-constantofshape", onnx_models.sized_by_input("ConstantOfShape")),
        ("hostile-expand", onnx_models.sized_by_input("Expand")),
    ]:
        deploy(server, name, data)
    return grpc_service_pb2_grpc.GRPCInferenceServiceStub(server.channel)


def v2_request(model: str, name: str, array: np.ndarray) -> oip_pb.ModelInferRequest:
    tensor = from_array(name, array, raw=True)
    return oip_pb.ModelInferRequest(
        model_name=model,
        raw_input_contents=[tensor.raw_data],
        inputs=[oip_pb.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=array.shape)],
    )


def test_run_failures_are_client_errors_on_every_front_door(server, hostile):
    """Reshaping 3x2 to [4, -1] fails inside onnxruntime: INVALID_ARGUMENT on mds.v1 and V2, unary and streamed."""
    bad = np.ones((3, 2), np.float32)
    fragment = "onnxruntime could not run model 'hostile-reshape'"
    assert_status(
        lambda: server.inference.Predict(request("hostile-reshape", {"x": bad})),
        grpc.StatusCode.INVALID_ARGUMENT,
        fragment,
        "Reshape",
    )
    (reply,) = server.inference.PredictStream(iter([request("hostile-reshape", {"x": bad})]), timeout=60)
    assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and fragment in reply.error.message
    assert_status(
        lambda: hostile.ModelInfer(v2_request("hostile-reshape", "x", bad)), grpc.StatusCode.INVALID_ARGUMENT, fragment
    )
    (streamed,) = hostile.ModelStreamInfer(iter([v2_request("hostile-reshape", "x", bad)]), timeout=60)
    assert streamed.error_message.startswith("INVALID_ARGUMENT: " + fragment)
    good = server.inference.Predict(request("hostile-reshape", {"x": np.ones((2, 2), np.float32)}))
    assert outputs_of(good)["y"].shape == (4, 1)
    assert_serving(server)


@pytest.mark.usefixtures("no_allocation")
@pytest.mark.parametrize(
    "model, shape",
    [
        ("hostile-constantofshape", [10**12]),
        ("hostile-expand", [10**6, 10**6]),
        ("hostile-constantofshape", [2**40, 2**40]),
    ],
)
def test_run_time_allocation_of_a_trillion_elements(server, hostile, model, shape):
    """A 12-byte request asking the model for 10**12 floats or more: refused by onnxruntime's allocator, not run."""
    huge = request(model, {"shape": np.array(shape, np.int64)})
    with pytest.raises(grpc.RpcError) as caught:
        server.inference.Predict(huge, timeout=60)
    assert caught.value.code() in RUN_FAILED, caught.value.details()
    assert f"onnxruntime could not run model {model!r}" in caught.value.details()
    small = server.inference.Predict(request(model, {"shape": np.array([2, 3], np.int64)}), timeout=60)
    assert outputs_of(small)["y"].shape == (2, 3)
    assert_serving(server)
