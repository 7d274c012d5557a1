"""Dynamic batching: requests share onnxruntime runs, each gets its own rows back, deadlines hold."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import REGISTRY

import onnx_models
from harness import assert_status, outputs_of, parts, request, upload_requests
from mds.v1 import model_service_pb2
from mds_grpc.core.errors import DeadlineExceeded, InvalidArgument
from mds_grpc.core.inference import InferenceEngine
from mds_grpc.core.records import BatchingPolicy
from mds_grpc.core.uploads import UploadHeader

RNG = np.random.default_rng(7)


def runs_and_rows(model: str) -> tuple[float, float]:
    """onnxruntime runs so far for `model`, and the rows they took (from the batch-size histogram)."""
    labels = {"model": model, "version": "1"}
    return (
        REGISTRY.get_sample_value("mds_inference_batch_rows_count", labels) or 0,
        REGISTRY.get_sample_value("mds_inference_batch_rows_sum", labels) or 0,
    )


async def batching_engine(registry, name: str, max_rows: int, delay_us: int) -> InferenceEngine:
    policy = BatchingPolicy(max_rows, delay_us)
    await registry.upload(UploadHeader(name=name, batching=policy), parts(onnx_models.dense()))
    return InferenceEngine(registry, ThreadPoolExecutor(2))


def rows(count: int) -> dict[str, np.ndarray]:
    return {"x": RNG.standard_normal((count, 8)).astype(np.float32)}


def expected(x: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(onnx_models.dense()).run(["scores", "label"], x)


async def test_concurrent_requests_share_one_run_and_get_their_own_rows(registry):
    engine = await batching_engine(registry, "dense-batched", 4, 1_000_000)
    requests = [rows(1), rows(2), rows(1)]  # 4 rows: the batch is full, so nobody waits the full second
    results = await asyncio.gather(*(engine.predict("dense-batched", 0, x) for x in requests))
    assert runs_and_rows("dense-batched") == (1, 4)
    for x, result in zip(requests, results, strict=True):
        for (name, got), want in zip(result.outputs, expected(x), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)
    # A request bigger than the batch runs by itself.
    alone = rows(6)
    result = await engine.predict("dense-batched", 0, alone)
    np.testing.assert_allclose(result.outputs[0][1], expected(alone)[0], rtol=1e-6)
    assert runs_and_rows("dense-batched") == (2, 10)


async def test_requests_for_different_outputs_do_not_share_a_run(registry):
    engine = await batching_engine(registry, "dense-split", 8, 0)
    scores, label = await asyncio.gather(
        engine.predict("dense-split", 0, rows(1), ["scores"]), engine.predict("dense-split", 0, rows(1), ["label"])
    )
    assert [n for n, _ in scores.outputs] == ["scores"] and [n for n, _ in label.outputs] == ["label"]
    assert runs_and_rows("dense-split") == (2, 2)


async def test_deadlines_hold_while_waiting_for_a_batch(registry):
    engine = await batching_engine(registry, "dense-deadline", 64, 1_000_000)
    with pytest.raises(DeadlineExceeded, match="before the model ran"):
        await engine.predict("dense-deadline", 0, rows(1), deadline=time.monotonic() - 0.001)
    # Alone, it would wait the policy's full second; its 0.6 s deadline makes it go after ~0.3 s.
    result = await engine.predict("dense-deadline", 0, rows(1), deadline=time.monotonic() + 0.6)
    assert result.outputs[0][1].shape == (1, 3)


async def test_a_cancelled_request_leaves_its_batch(registry):
    engine = await batching_engine(registry, "dense-cancel", 2, 1_000_000)
    leaving = asyncio.ensure_future(engine.predict("dense-cancel", 0, rows(1)))
    loaded = await registry.load("dense-cancel")
    while loaded.batcher is None:  # event-loop turns until it is queued (it creates the batcher as it queues)
        await asyncio.sleep(0)
    leaving.cancel()
    staying = rows(2)
    result = await engine.predict("dense-cancel", 0, staying)
    np.testing.assert_allclose(result.outputs[0][1], expected(staying)[0], rtol=1e-6)
    assert runs_and_rows("dense-cancel") == (1, 2)


async def test_requests_that_disagree_on_rows_are_refused(registry):
    await registry.upload(
        UploadHeader(name="identity-batched", batching=BatchingPolicy(4, 0)),
        parts(onnx_models.identity_all_dtypes(("FP32", "INT64"))),
    )
    engine = InferenceEngine(registry, ThreadPoolExecutor(1))
    inputs = {"x_FP32": np.zeros((1, 2), np.float32), "x_INT64": np.zeros((2, 2), np.int64)}
    with pytest.raises(InvalidArgument, match="every input needs the same first dimension"):
        await engine.predict("identity-batched", 0, inputs)


def test_batching_is_stored_served_and_refused_for_fixed_first_dimensions(server, unique):
    batching = model_service_pb2.Batching(max_batch_size=8, max_queue_delay_us=500)
    model = server.models.UploadModel(upload_requests(unique, onnx_models.dense(), batching=batching), timeout=120)
    assert model.batching == batching
    assert server.models.GetModel(model_service_pb2.GetModelRequest(name=unique)).batching == batching
    x = rows(3)
    reply = server.inference.Predict(request(unique, x), timeout=30)
    np.testing.assert_allclose(outputs_of(reply)["scores"], expected(x)[0], rtol=1e-6)

    assert_status(
        lambda: server.models.UploadModel(
            upload_requests(unique + "-scalar", onnx_models.add_scalar(), batching=batching), timeout=120
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "batching needs",
        "input 's'",
        "first dimension is dynamic",
    )
    assert_status(
        lambda: server.models.GetModel(model_service_pb2.GetModelRequest(name=unique + "-scalar")),
        grpc.StatusCode.NOT_FOUND,
    )
    too_slow = model_service_pb2.Batching(max_batch_size=8, max_queue_delay_us=2_000_000)
    assert_status(
        lambda: server.models.UploadModel(
            upload_requests(unique + "-slow", onnx_models.dense(), batching=too_slow), timeout=120
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_queue_delay_us must be at most 1000000",
    )


async def test_requests_left_for_the_next_batch_are_joined_by_newcomers(registry):
    """5 + 5 rows overflow a batch of 8: the second request waits for the next run, which a third joins."""
    engine = await batching_engine(registry, "dense-overflow", 8, 100_000)
    await engine.predict("dense-overflow", 0, rows(8))  # a full batch; the model's lookup is cached from now on
    requests = [rows(5), rows(5), rows(2)]  # so all three queue in the same event-loop turn
    results = await asyncio.gather(*(engine.predict("dense-overflow", 0, x) for x in requests))
    for x, result in zip(requests, results, strict=True):
        np.testing.assert_allclose(result.outputs[0][1], expected(x)[0], rtol=1e-6)
    assert runs_and_rows("dense-overflow") == (3, 20)
