"""Workloads under request load from ghz: (a) the tiny MLP unary, (b) bidi streams, (c) a compute-heavy real model."""

from pathlib import Path

import numpy as np

from harness import (
    ALIAS,
    MODEL_INFER,
    MODEL_STREAM_INFER,
    PREDICT,
    PREDICT_STREAM,
    PREDICT_VIA_ALIAS,
    Target,
    check_outputs,
    ghz,
    in_process,
    session,
    set_alias,
)
from mds.oip import grpc_service_pb2 as oip
from mds.v1 import inference_service_pb2 as pb
from mds.v1.model_service_pb2 import Batching
from mds_grpc.api.tensors import from_array

STREAM_MESSAGES = 200
HEAVY_CONCURRENCY = 16
HEAVY_BATCH = 8
HEAVY_SHAPE = (1, 3, 160, 160)  # one image
HEAVY_QUEUE_DELAY_US = 5000


class Payloads:
    """One input for MODEL as an mds.v1 Predict and a V2 ModelInfer request (in memory and as ghz -B files),
    and what in-process onnxruntime answers to it."""

    def __init__(self, work: Path, model: str, path: Path, x: np.ndarray, batching: Batching | None = None):
        self.model, self.path, self.x, self.batching = model, path, x, batching
        self.input = session(path).get_inputs()[0].name
        self.want = session(path).run(None, {self.input: x})[0]
        self.predict = pb.PredictRequest(model=model, inputs=[from_array(self.input, x, raw=True)])
        self.through_alias = pb.PredictRequest(model=model, alias=ALIAS, inputs=self.predict.inputs)
        self.infer = oip.ModelInferRequest(
            model_name=model,
            inputs=[oip.ModelInferRequest.InferInputTensor(name=self.input, datatype="FP32", shape=x.shape)],
            raw_input_contents=[x.tobytes()],
        )
        self.requests = {PREDICT: self.predict, PREDICT_VIA_ALIAS: self.through_alias, MODEL_INFER: self.infer}
        self.files = {call: work / f"{model}-{call.rsplit('/', 1)[1]}.bin" for call in self.requests}
        for call, request in self.requests.items():
            self.files[call].write_bytes(request.SerializeToString())

    def check(self, target: Target, call: str) -> None:
        check_outputs(target, call, self.requests[call], self.want)

    def load(self, target: Target, call: str, concurrency: int, duration: float, streams: bool = False) -> dict:
        """ghz against TARGET; stream calls (PredictStream, ModelStreamInfer) carry the unary call's body."""
        unary = {PREDICT_STREAM: PREDICT, MODEL_STREAM_INFER: MODEL_INFER}.get(call, call)
        return ghz(
            target, call, self.files[unary], concurrency, duration, stream_messages=STREAM_MESSAGES if streams else 0
        )


def mlp_payloads(bench) -> Payloads:
    x = np.random.default_rng(0).standard_normal((1, 784)).astype(np.float32)
    return Payloads(bench.work, "mlp", bench.mlp_path, x)


def unary(bench) -> list[dict]:
    """(a) MLP batch 1, unary: in-process, the floor, MDS (Predict by version and through an alias, ModelInfer;
    one process and two) and the peers (ModelInfer)."""
    load = mlp_payloads(bench)
    floor, mds = bench.floor(load), bench.mds(load)
    set_alias(mds, load.model, 1)
    calls = [(floor, PREDICT), (mds, PREDICT), (mds, PREDICT_VIA_ALIAS), (mds, MODEL_INFER)]
    calls.append((bench.mds(load, processes=2), PREDICT))
    calls += [(bench.peer(name, load), MODEL_INFER) for name in bench.peer_names]
    for target, call in calls:
        load.check(target, call)
    rows = [in_process(bench.mlp_path, {load.input: load.x}, bench.duration)]
    for concurrency in bench.concurrencies:
        rows += [load.load(target, call, concurrency, bench.duration) for target, call in calls]
    return rows


def streams(bench) -> list[dict]:
    """(b) MLP batch 1 over bidi streams of 200 requests each: one stream, then 8 at once."""
    load = mlp_payloads(bench)
    calls = [(bench.floor(load), PREDICT_STREAM), (bench.mds(load), PREDICT_STREAM)]
    if "MLServer" in bench.peer_names:
        calls.append((bench.peer("MLServer", load), MODEL_STREAM_INFER))
    for target, call in calls:
        load.check(target, PREDICT if call == PREDICT_STREAM else MODEL_INFER)
    return [
        load.load(target, call, count, bench.duration, streams=True)
        for count in ([1] if bench.smoke else [1, 8])
        for target, call in calls
    ]


def heavy(bench) -> list[dict]:
    """(c) PP-OCRv4's text detector on one 160x160 image per request, at concurrency 16; MDS with dynamic
    batching off, and on (the same model uploaded again with batches of up to HEAVY_BATCH images)."""
    import models

    x = np.random.default_rng(0).random(HEAVY_SHAPE, np.float32)
    plain = Payloads(bench.work, "ocr-det", models.ocr_detector(), x)
    batched = Payloads(
        bench.work,
        "ocr-det-batched",
        plain.path,
        x,
        Batching(max_batch_size=HEAVY_BATCH, max_queue_delay_us=HEAVY_QUEUE_DELAY_US),
    )
    rows = [
        in_process(plain.path, {plain.input: np.repeat(x, batch, axis=0)}, bench.duration) for batch in (1, HEAVY_BATCH)
    ]
    for load, target in ((plain, bench.floor(plain)), (plain, bench.mds(plain)), (batched, bench.mds(batched))):
        load.check(target, PREDICT)
        rows.append(load.load(target, PREDICT, HEAVY_CONCURRENCY, bench.duration))
    rows[-1]["target"] = f"MDS, dynamic batching ≤{HEAVY_BATCH}"
    return rows
