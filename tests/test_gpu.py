"""Models on a real GPU through onnxruntime-gpu (`MDS_GPU=1 make test`, docs/gpu.md).

These tests run only where onnxruntime lists the CUDA provider; elsewhere (the CPU build) each is reported
as skipped in the summary. Where CUDA is listed but cannot start (no driver, no device), they fail."""

import ctypes
import gc
import os

import numpy as np
import onnxruntime as ort
import pytest
import requests

import onnx_models
from harness import ServerProcess, outputs_of, request, upload
from local_machine import free_port
from mds.v1 import model_service_pb2
from mds_grpc.core.errors import FailedPrecondition
from mds_grpc.core.placement import SessionTarget
from mds_grpc.core.runtime import OnnxSession, RunFailed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        "CUDAExecutionProvider" not in ort.get_available_providers(),
        reason="no CUDA provider in this onnxruntime (the CPU build); MDS_GPU=1 make test installs onnxruntime-gpu",
    ),
]
MiB = 1 << 20


def nvinfer_present() -> bool:
    try:
        ctypes.CDLL("libnvinfer.so.10")
    except OSError:
        return False
    return True


def device_memory_of_this_process() -> int:
    """Bytes this process holds on GPU 0, as the driver counts them (NVML)."""
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    mine = [p for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid == os.getpid()]
    return sum(p.usedGpuMemory or 0 for p in mine)


@pytest.fixture
def big_model(tmp_path):
    """A classifier over 4096 features into 4096 classes: 64 MiB of weights."""
    path = tmp_path / "big.onnx"
    path.write_bytes(onnx_models.dense(features=4096, classes=4096))
    return path


def test_a_session_on_cuda_matches_the_cpu(big_model):
    x = np.random.default_rng(1).random((16, 4096), np.float32)
    gpu = OnnxSession(big_model, target=SessionTarget(("cuda",), device_memory_bytes=1 << 30))
    assert gpu.providers[0] == "cuda" and gpu.device == 0
    cpu = OnnxSession(big_model)
    (on_gpu,), (on_cpu,) = gpu.run(["scores"], {"x": x}), cpu.run(["scores"], {"x": x})
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-3, atol=1e-3)


def test_dropping_a_session_frees_its_device_memory(big_model):
    before = device_memory_of_this_process()
    session = OnnxSession(big_model, target=SessionTarget(("cuda",), device_memory_bytes=1 << 30))
    session.run(["scores"], {"x": np.ones((64, 4096), np.float32)})
    loaded = device_memory_of_this_process()
    del session
    gc.collect()
    after = device_memory_of_this_process()
    print(f"device memory of this process: {before / MiB:.0f} -> {loaded / MiB:.0f} -> {after / MiB:.0f} MiB")
    assert loaded - before >= 64 * MiB  # the weights at least
    assert loaded - after >= 64 * MiB  # given back


def test_a_run_cannot_take_more_device_memory_than_its_limit(big_model):
    session = OnnxSession(big_model, target=SessionTarget(("cuda",), device_memory_bytes=256 * MiB))
    session.run(["scores"], {"x": np.ones((16, 4096), np.float32)})
    with pytest.raises(RunFailed):  # its output alone would be 1 GiB
        session.run(["scores"], {"x": np.ones((65536, 4096), np.float32)})


@pytest.mark.skipif(not nvinfer_present(), reason="TensorRT 10 libraries (libnvinfer.so.10) are not installed")
def test_tensorrt_engines_are_built_once_and_kept_on_disk(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(onnx_models.dense(features=64, classes=8))
    engines = tmp_path / "engines"
    target = SessionTarget(("tensorrt",), engine_cache=engines, device_memory_bytes=1 << 30)
    OnnxSession(path, target=target).run(["scores"], {"x": np.ones((4, 64), np.float32)})
    built = {p: p.stat().st_mtime_ns for p in engines.rglob("*.engine")}
    assert built
    OnnxSession(path, target=target).run(["scores"], {"x": np.ones((4, 64), np.float32)})
    assert {p: p.stat().st_mtime_ns for p in engines.rglob("*.engine")} == built


def test_tensorrt_without_its_libraries_is_a_failed_precondition(tmp_path):
    if nvinfer_present():
        pytest.skip("TensorRT is installed here")
    path = tmp_path / "model.onnx"
    path.write_bytes(onnx_models.dense())
    with pytest.raises(FailedPrecondition, match="tensorrt cannot run the model"):
        OnnxSession(path, target=SessionTarget(("tensorrt",)))


def test_a_server_runs_versions_on_the_gpu_and_reports_its_memory(tmp_path, unique):
    metrics_port = free_port()
    server = ServerProcess(
        tmp_path,
        MDS_EXECUTION_PROVIDERS="cuda,cpu",
        MDS_METRICS_PORT=str(metrics_port),
        MDS_GPU_MEMORY_BYTES=str(8 << 30),
    ).start()
    try:
        placement = model_service_pb2.Placement(execution_providers=["cuda"], device_memory_bytes=1 << 30)
        model = upload(server, unique, onnx_models.dense(), placement=placement, batching={"max_batch_size": 8})
        assert list(model.execution_providers) == ["cuda"]
        x = np.random.default_rng(2).random((3, 8), np.float32)
        got = outputs_of(server.inference.Predict(request(unique, {"x": x}), timeout=60))
        assert got["scores"].shape == (3, 3)
        scrape = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert 'mds_device_sessions{device="0"} 1.0' in scrape
        assert f'mds_device_memory_bytes{{device="0"}} {float(1 << 30)}' in scrape
        server.models.DeleteModel(model_service_pb2.DeleteModelRequest(name=unique), timeout=30)
        scrape = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert 'mds_device_sessions{device="0"} 0.0' in scrape
    finally:
        assert server.stop() == 0
