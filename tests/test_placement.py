"""Where versions run: execution providers per server and per version, their errors, fallback, and the GPU
memory budget. This machine has no GPU and runs onnxruntime's CPU build; tests that need a GPU are in
tests/test_gpu.py. Where a test below needs a session on a GPU, it says what it fakes."""

import dataclasses
import hashlib
import logging
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from prometheus_client import REGISTRY

import onnx_models
from harness import ServerProcess, assert_status, request, serve_fails, storage_of, upload, watch
from mds.oip import grpc_service_pb2, grpc_service_pb2_grpc
from mds.v1 import job_service_pb2, model_service_pb2
from mds_grpc.api.tensors import from_array
from mds_grpc.core.errors import FailedPrecondition, InvalidArgument
from mds_grpc.core.model_cache import ModelCache
from mds_grpc.core.placement import Placer, SessionTarget, parse_providers
from mds_grpc.core.records import (
    MAIN_FILE,
    ModelRecord,
    Placement,
    StoredFile,
    record_from_dict,
    record_to_dict,
    utc_now,
)
from mds_grpc.core.runtime import OnnxSession, available_providers
from mds_grpc.storage.local_blobs import LocalBlobStore

GiB = 1 << 30


@pytest.fixture
def model_file(tmp_path):
    def save(data: bytes) -> Path:
        path = tmp_path / f"{hashlib.sha256(data).hexdigest()[:12]}.onnx"
        path.write_bytes(data)
        return path

    return save


def a_record(name: str) -> ModelRecord:
    return ModelRecord(name, 1, utc_now(), (StoredFile(MAIN_FILE, "0" * 64, 1000),), (), ())


def test_provider_lists_are_checked():
    assert parse_providers(" CUDA, cpu ") == ("cuda", "cpu")
    with pytest.raises(InvalidArgument, match="unknown execution provider 'rocm'; MDS knows tensorrt, cuda, cpu"):
        parse_providers("rocm,cpu")
    with pytest.raises(InvalidArgument, match="must not repeat"):
        parse_providers("cpu,cpu")
    with pytest.raises(InvalidArgument, match="empty"):
        parse_providers(" , ")


def test_a_placement_names_providers_this_server_has_and_fits_a_gpu():
    placer = Placer(("cpu",), ("cpu",), device_budget_bytes=8 * GiB)
    placer.check(Placement(("cpu",)))
    with pytest.raises(FailedPrecondition, match="this server has no cuda execution provider; it has cpu"):
        placer.check(Placement(("cuda", "cpu")))
    gpu_server = Placer(("cuda", "cpu"), ("cuda", "cpu"), device_budget_bytes=8 * GiB)
    with pytest.raises(FailedPrecondition, match="exceeds the device memory this server gives models on one GPU"):
        gpu_server.check(Placement(("cuda",), device_memory_bytes=9 * GiB))
    # The server's list applies to versions without their own; providers this server lacks are skipped.
    assert gpu_server.resolve(Placement()) == ("cuda", "cpu")
    assert Placer(("cuda", "cpu"), ("cpu",)).resolve(Placement()) == ("cpu",)
    with pytest.raises(FailedPrecondition, match="runs on cuda, and this server has only cpu"):
        placer.target("m", 1, Placement(("cuda",)))


def test_a_placement_is_stored_only_when_set():
    stored = record_to_dict(a_record("m"))
    assert "placement" not in stored  # so servers that predate placements read it too
    assert record_from_dict(stored).placement == Placement()
    placed = record_to_dict(dataclasses.replace(a_record("m"), placement=Placement(("cuda", "cpu"), 1)))
    assert record_from_dict(placed).placement == Placement(("cuda", "cpu"), 1)


def test_a_gpu_that_cannot_load_the_model_falls_back_only_when_the_list_allows(caplog, model_file):
    """onnxruntime's CPU build has no CUDA provider: a session asked for cuda first cannot get it."""
    path = model_file(onnx_models.add_two())
    with caplog.at_level(logging.WARNING, "mds.runtime"):
        session = OnnxSession(path, target=SessionTarget(("cuda", "cpu")))
    assert session.providers == ("cpu",) and session.device is None
    assert "cuda cannot run the model (this onnxruntime has no cuda provider); trying cpu" in caplog.text
    with pytest.raises(FailedPrecondition, match=r"placement \(cuda\) allows no other provider"):
        OnnxSession(path, target=SessionTarget(("cuda",)))


def test_gpu_runs_bind_outputs_to_host_memory(model_file):
    """No GPU here: the session is marked as on GPU 0 (fake), so that its runs take the bound path, which
    onnxruntime's CPU provider runs as well."""
    session = OnnxSession(model_file(onnx_models.dense()))
    x = np.random.default_rng(0).random((5, 8), np.float32)
    plain = session.run(["scores", "label"], {"x": x})
    session.device = 0
    bound = session.run(["scores", "label"], {"x": x})
    for got, expected in zip(bound, plain, strict=True):
        np.testing.assert_array_equal(got, expected)


def device_sessions(device: int) -> tuple[float | None, float | None]:
    """mds_device_sessions and mds_device_memory_bytes of GPU `device`, as a scrape reads them."""
    labels = {"device": str(device)}
    return REGISTRY.get_sample_value("mds_device_sessions", labels), REGISTRY.get_sample_value(
        "mds_device_memory_bytes", labels
    )


def test_gpu_sessions_count_against_their_gpu_budget_least_recently_used_first(tmp_path, model_file):
    """No GPU here: real CPU sessions are marked (fake) as holding 3 GiB each on GPU 0 or 1."""
    placer = Placer(("cuda", "cpu"), ("cuda", "cpu"), device_budget_bytes=8 * GiB, engine_root=tmp_path / "engines")
    cache = ModelCache(LocalBlobStore(tmp_path / "blobs"), tmp_path / "models", 1 << 40, placer=placer)
    path = model_file(onnx_models.dense())

    def put(name: str, device: int | None):
        session = OnnxSession(path)
        if device is not None:
            session.device = device
            session.target = SessionTarget(("cuda", "cpu"), device, 3 * GiB)
        return cache.put(a_record(name), session)

    put("a", 0), put("b", 0), put("other-gpu", 1), put("on-cpu", None)
    assert device_sessions(0) == (2, 6 * GiB)
    put("c", 0)  # 9 GiB would not fit: "a", used least recently on GPU 0, goes
    assert ("a", 1) not in cache and all((name, 1) in cache for name in ("b", "other-gpu", "on-cpu", "c"))
    assert cache.device_bytes(0) == 6 * GiB and cache.device_bytes(1) == 3 * GiB
    assert device_sessions(0) == (2, 6 * GiB) and device_sessions(1) == (1, 3 * GiB)
    (tmp_path / "engines" / "b" / "1" / "device0-fp32-0").mkdir(parents=True)
    cache.forget("b", [1])  # a deleted version frees its share and its TensorRT engines
    assert device_sessions(0) == (1, 3 * GiB)
    assert not (tmp_path / "engines" / "b" / "1").exists()


@pytest.fixture(scope="module")
def cpu_server(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("placement")).start()
    yield server
    assert server.stop() == 0


def test_upload_refuses_a_provider_the_server_lacks(cpu_server, unique):
    placement = model_service_pb2.Placement(execution_providers=["cuda", "cpu"])
    assert_status(
        lambda: upload(cpu_server, unique, onnx_models.add_two(), placement=placement),
        grpc.StatusCode.FAILED_PRECONDITION,
        "this server has no cuda execution provider; it has cpu",
    )
    assert_status(
        lambda: upload(cpu_server, unique, onnx_models.add_two(), placement={"execution_providers": ["rocm"]}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown execution provider 'rocm'",
    )


def test_a_model_shows_where_it_runs(cpu_server, unique):
    default = upload(cpu_server, unique, onnx_models.add_two())
    assert not default.HasField("placement") and list(default.execution_providers) == ["cpu"]
    placement = model_service_pb2.Placement(execution_providers=["CPU"])
    placed = upload(cpu_server, unique, onnx_models.add_two(), placement=placement)
    assert json_format.MessageToDict(placed.placement) == {"executionProviders": ["cpu"]}
    got = cpu_server.models.GetModel(model_service_pb2.GetModelRequest(name=unique, version=placed.version))
    assert got.placement == placed.placement and list(got.execution_providers) == ["cpu"]
    x = np.ones(3, np.float32)
    reply = cpu_server.inference.Predict(request(unique, {"a": x, "b": x}), timeout=30)
    assert reply.version == placed.version


def test_v2_server_metadata_lists_the_providers(cpu_server):
    v2 = grpc_service_pb2_grpc.GRPCInferenceServiceStub(cpu_server.channel)
    reply = v2.ServerMetadata(grpc_service_pb2.ServerMetadataRequest(), timeout=10)
    assert [e for e in reply.extensions if e.startswith("execution_provider:")] == [
        f"execution_provider:{name}" for name in available_providers()
    ]


@pytest.mark.parametrize(
    "value, line",
    [
        (
            "rocm",
            "error: MDS_EXECUTION_PROVIDERS='rocm': unknown execution provider 'rocm'; MDS knows tensorrt, cuda, cpu",
        ),
        ("cuda", "error: MDS_EXECUTION_PROVIDERS='cuda' names no provider this server has (cpu); GPUs need"),
    ],
)
def test_a_server_without_any_listed_provider_does_not_start(tmp_path, value, line):
    (error,) = serve_fails(tmp_path, {"MDS_EXECUTION_PROVIDERS": value}, "--grpc-port", "0")
    assert error.startswith(line)


def test_a_listed_provider_the_server_lacks_is_skipped_with_a_warning(tmp_path, unique):
    server = ServerProcess(tmp_path, MDS_EXECUTION_PROVIDERS="cuda,cpu").start()
    try:
        model = upload(server, unique, onnx_models.add_two())
        assert list(model.execution_providers) == ["cpu"]
    finally:
        assert server.stop() == 0
    assert "this server has no cuda; models run on the next listed" in (tmp_path / "stdout.log").read_text()


def test_a_version_placed_where_this_server_cannot_run_it_fails_predictions_and_jobs(cpu_server, unique):
    """A version another server recorded for cuda (written to the shared store directly: no GPU server here)."""
    cpu_version = upload(cpu_server, unique, onnx_models.dense())
    metadata = storage_of(cpu_server).metadata
    record = metadata.get(unique, cpu_version.version)
    gpu_only = metadata.create(dataclasses.replace(record, version=0, placement=Placement(("cuda",))))
    got = cpu_server.models.GetModel(model_service_pb2.GetModelRequest(name=unique, version=gpu_only.version))
    assert list(got.placement.execution_providers) == ["cuda"] and not got.execution_providers
    x = np.ones((2, 8), np.float32)
    assert_status(
        lambda: cpu_server.inference.Predict(request(unique, {"x": x}, version=gpu_only.version), timeout=30),
        grpc.StatusCode.FAILED_PRECONDITION,
        f"model {unique!r} version {gpu_only.version} runs on cuda, and this server has only cpu",
    )
    job = cpu_server.jobs.CreateJob(
        job_service_pb2.CreateJobRequest(model=unique, version=gpu_only.version, inputs=[from_array("x", x, raw=True)])
    )
    final = watch(cpu_server, job.id)[-1]
    assert final.state == job_service_pb2.JOB_STATE_FAILED and "runs on cuda" in final.error
