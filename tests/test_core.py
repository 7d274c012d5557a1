"""The protocol-neutral core driven directly: deadlines, the model cache bound, settings."""

import asyncio
import gc
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import onnx_models
from harness import parts
from mds_grpc.config import load_settings
from mds_grpc.core import dtypes, result_files
from mds_grpc.core.batching import Batcher
from mds_grpc.core.errors import DeadlineExceeded, NotFound
from mds_grpc.core.inference import InferenceEngine
from mds_grpc.core.model_cache import LoadedModel
from mds_grpc.core.records import BatchingPolicy, StoredFile
from mds_grpc.core.runtime import OnnxSession
from mds_grpc.core.to_the_end import to_the_end
from mds_grpc.core.uploads import UploadHeader
from mds_grpc.server import build_core


async def test_a_request_past_its_deadline_is_not_run(registry):
    await registry.upload(UploadHeader(name="adder"), parts(onnx_models.add_two()))
    engine = InferenceEngine(registry, ThreadPoolExecutor(1))
    inputs = {"a": np.ones(1, np.float32), "b": np.ones(1, np.float32)}
    with pytest.raises(DeadlineExceeded, match="before the model ran"):
        await engine.predict("adder", 0, inputs, deadline=time.monotonic() - 0.001)
    result = await engine.predict("adder", 0, inputs, deadline=time.monotonic() + 60)
    assert result.outputs[0][1].tolist() == [2.0]


async def test_model_cache_keeps_only_the_most_recent_when_over_its_bound(registry):
    first = await registry.upload(UploadHeader(name="one"), parts(onnx_models.add_two(1.0)))
    assert ("one", 1) in registry.cache  # warmed right after upload
    folders = registry.cache.folder_root
    assert (folders / "one" / "1" / "model.onnx").exists()
    second = await registry.upload(UploadHeader(name="two"), parts(onnx_models.add_two(2.0)))
    assert ("two", 1) in registry.cache and ("one", 1) not in registry.cache
    assert not (folders / "one" / "1").exists()  # the local copy goes with the session
    reloaded = await registry.load("one")  # lazily loaded again from storage
    assert reloaded.record == first and ("two", 1) not in registry.cache
    assert (folders / "one" / "1" / "model.onnx").exists() and not (folders / "two" / "1").exists()
    assert second.version == 1


def test_settings_come_from_dotenv_env_and_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("MDS_GRPC_PORT=6001\nMDS_MAX_MODEL_BYTES=123\nMDS_LOG_DIR=/tmp/x\n")
    monkeypatch.setenv("MDS_MAX_MODEL_BYTES", "456")
    for name in ("MDS_GRPC_PORT", "MDS_LOG_DIR"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(log_dir=tmp_path / "logs")
    assert (settings.grpc_port, settings.max_model_bytes, settings.log_dir) == (6001, 456, tmp_path / "logs")
    monkeypatch.setenv("MDS_GRPC_PORT", "many")
    with pytest.raises(SystemExit, match="MDS_GRPC_PORT='many' is not a valid int"):
        load_settings()


async def test_the_session_warmed_by_an_upload_uses_the_configured_threads(tmp_path):
    registry = build_core(load_settings(data_dir=tmp_path, ort_intra_op_threads=1)).registry
    await registry.upload(UploadHeader(name="adder"), parts(onnx_models.add_two()))
    loaded = await registry.load("adder")
    assert loaded.session.intra_op_threads == 1


class CountingExecutor(ThreadPoolExecutor):
    submitted = 0

    def submit(self, *args, **kwargs):
        self.submitted += 1
        return super().submit(*args, **kwargs)


@pytest.mark.parametrize("inline_max_seconds, submitted", [(1.0, 1), (0.0, 4)])
async def test_short_runs_move_onto_the_event_loop(registry, inline_max_seconds, submitted):
    """After one run on the executor shows the model is quick, the thread hop is skipped."""
    await registry.upload(UploadHeader(name="adder"), parts(onnx_models.add_two()))
    executor = CountingExecutor(1)
    engine = InferenceEngine(registry, executor, inline_max_seconds)
    inputs = {"a": np.ones(1, np.float32), "b": np.ones(1, np.float32)}
    for _ in range(4):
        result = await engine.predict("adder", 0, inputs)
        assert result.outputs[0][1].tolist() == [2.0]
    assert executor.submitted == submitted


async def test_runs_slowed_by_a_busy_machine_keep_a_short_model_on_the_event_loop(registry, monkeypatch):
    """A loaded machine takes the core away from a run now and then: its wall time grows, its CPU time does
    not. Faked here (the only fake): every wall-clock reading jumps 50 ms, as if each run were preempted."""
    await registry.upload(UploadHeader(name="adder"), parts(onnx_models.add_two()))
    executor = CountingExecutor(1)
    engine = InferenceEngine(registry, executor, inline_max_seconds=0.001)
    inputs = {"a": np.ones(1, np.float32), "b": np.ones(1, np.float32)}
    await engine.predict("adder", 0, inputs)  # the first run, on a thread, sets the estimate
    wall = time.perf_counter()

    def preempted() -> float:
        nonlocal wall
        wall += 0.05
        return wall

    monkeypatch.setattr(time, "perf_counter", preempted)
    for _ in range(50):
        await engine.predict("adder", 0, inputs)
    assert executor.submitted == 1


def memory_kib(field: str) -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])


async def files_of(path: Path, side: str):
    for name, file in (("model.onnx", path), (side, path.parent / side)):
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 20):
                yield name, chunk


async def test_a_big_upload_is_checked_lean_and_loaded_on_first_use(registry, tmp_path):
    """Past warm_max_bytes, checking the model neither prepacks its 32 MiB of weights nor keeps a session."""
    registry.warm_max_bytes = 1 << 20
    path = onnx_models.save_with_external_data(tmp_path / "big", rows=2048, columns=4096)
    side = "model.onnx.data"
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    before = memory_kib("VmRSS")
    await registry.upload(UploadHeader(name="big", external_files=(StoredFile(side, "", 0),)), files_of(path, side))
    assert memory_kib("VmHWM") - before < 16 * 1024  # a prepacking session alone would add 32 MiB
    assert ("big", 1) not in registry.cache
    engine = InferenceEngine(registry, ThreadPoolExecutor(1))
    x = np.ones((1, 2048), np.float32)
    result = await engine.predict("big", 0, {"x": x})
    assert result.outputs[0][1].shape == (1, 4096) and ("big", 1) in registry.cache


def live(kind: type) -> int:
    """Instances of `kind` still reachable after a full collection."""
    gc.collect()
    return sum(type(o) is kind for o in gc.get_objects())  # type(), not isinstance: no dead weak proxy is touched


async def test_evicted_and_deleted_versions_leave_nothing_reachable(registry):
    """Under concurrent predictions (batched and not) across six versions in a one-model cache, and deletes
    of half of them, every version that left the cache takes its session, batcher and statistics with it."""
    before = {kind: live(kind) for kind in (LoadedModel, OnnxSession, Batcher)}
    for seed in range(3):
        await registry.upload(
            UploadHeader(name="churn-batched", batching=BatchingPolicy(4, 500)), parts(onnx_models.dense(seed=seed))
        )
        await registry.upload(UploadHeader(name="churn-plain"), parts(onnx_models.dense(seed=seed)))
    engine = InferenceEngine(registry, ThreadPoolExecutor(2), inline_max_seconds=1.0)
    x = {"x": np.ones((2, 8), np.float32)}

    async def predict(name: str, version: int) -> str:
        try:
            await engine.predict(name, version, x)
        except NotFound:
            return "deleted"
        return "ok"

    calls = [predict(name, 1 + i % 3) for i in range(60) for name in ("churn-batched", "churn-plain")]
    results = await asyncio.gather(
        *calls[:60], registry.delete("churn-batched", 2), registry.delete("churn-plain", 3), *calls[60:]
    )
    assert results[60:62] == [[2], [3]]
    outcomes = results[:60] + results[62:]
    assert set(outcomes) <= {"ok", "deleted"} and outcomes.count("ok") > 60
    keys = [(name, version) for name in ("churn-batched", "churn-plain") for version in (1, 2, 3)]
    cached = sum(key in registry.cache for key in keys)  # 0 when the last one loaded was then deleted
    assert cached <= 1
    assert live(LoadedModel) - before[LoadedModel] == cached
    assert live(OnnxSession) - before[OnnxSession] == cached
    assert live(Batcher) - before[Batcher] <= cached


def test_job_result_files_keep_every_dtype(tmp_path):
    """.npz keeps extension dtypes (BF16) as raw voids: the file names each output's dtype, so none is misread."""
    outputs = [
        np.arange(6, dtype=np.float32).reshape(3, 2).astype(dtypes.BY_NAME["BF16"].numpy),
        np.array([[1, 2], [3, 4], [5, 6]], np.uint16),
        np.array([True, False, True]),
    ]
    result_files.save(tmp_path / "result.npz", outputs)
    loaded = result_files.load(tmp_path / "result.npz", len(outputs))
    assert [a.dtype for a in loaded] == [a.dtype for a in outputs]
    assert all(np.array_equal(a, b) for a, b in zip(loaded, outputs, strict=True))
    np.savez(tmp_path / "legacy.npz", outputs[0])  # as written before files named their dtypes
    assert result_files.load(tmp_path / "legacy.npz", 1)[0].dtype == dtypes.BY_NAME["BF16"].numpy


async def test_a_cleanup_waiting_for_a_thread_survives_repeated_cancellation():
    """A handler cancelled (again) while its cleanup waits for a busy thread pool still cleans up."""
    loop = asyncio.get_running_loop()
    pool, busy, cleaned = ThreadPoolExecutor(1), threading.Event(), threading.Event()
    pool.submit(busy.wait, 30)  # the cleanup below queues behind this

    task = asyncio.ensure_future(to_the_end(loop.run_in_executor(pool, cleaned.set)))
    for _ in range(2):
        await asyncio.sleep(0)  # let the task reach its await
        task.cancel()
    busy.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned.is_set()  # a plain `await` would have cancelled the queued cleanup before it ran
    pool.shutdown()
