"""What one request costs MDS's handler, by component, against the floor's handler: the tiny MLP at batch 1.

    python bench/profile_hot_path.py [--requests 400]

MDS's handlers (API keys on, access log, metrics, embedded storage) and the floor's (floor_server.py) are
called in this process, one request at a time, as gRPC would call them (a stream: per message); each figure
is the thread's CPU time per call, the least of ROUNDS rounds taken in turn with the others. That holds up on
a loaded machine better than throughput does. Each component is also timed alone as the handler calls it;
`glue` is the handler less its components.
"""

import argparse
import asyncio
import itertools
import logging
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "scripts")]
import floor_server  # noqa: E402
from mds.oip import grpc_service_pb2 as oip  # noqa: E402
from mds.oip import grpc_service_pb2_grpc  # noqa: E402
from mds.v1 import inference_service_pb2 as pb  # noqa: E402
from mds.v1 import inference_service_pb2_grpc  # noqa: E402
from mds_grpc import metrics  # noqa: E402
from mds_grpc.api import contract  # noqa: E402
from mds_grpc.api.auth import Guard  # noqa: E402
from mds_grpc.api.inference_servicer import InferenceServicer, encode_prediction  # noqa: E402
from mds_grpc.api.oip import infer_response, input_arrays  # noqa: E402
from mds_grpc.api.oip_servicer import OipServicer  # noqa: E402
from mds_grpc.api.rpc_wrapper import ServedServer  # noqa: E402
from mds_grpc.api.tensors import from_array, to_arrays  # noqa: E402
from mds_grpc.config import load_settings  # noqa: E402
from mds_grpc.core.auth import Authenticator, new_key  # noqa: E402
from mds_grpc.core.inference import InferenceEngine, Signature  # noqa: E402
from mds_grpc.core.model_folder import register_folder  # noqa: E402
from mds_grpc.logs import AccessLog, configure_logging  # noqa: E402
from mds_grpc.server import SERVICES, build_core  # noqa: E402
from models import mlp  # noqa: E402

ROUNDS = 25
PREDICT = "/mds.v1.InferenceService/Predict"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


class Context:
    """The parts of grpc.aio.ServicerContext the handlers use, for a call that succeeds."""

    def __init__(self, token: str):
        self.metadata = (("authorization", f"Bearer {token}"), ("user-agent", "grpc-python"))

    def invocation_metadata(self):
        return self.metadata

    def time_remaining(self):
        return None

    def code(self):
        return None

    async def abort(self, code, message):
        raise RuntimeError(f"{code}: {message}")


class Handlers:
    """Stands in for grpc.aio.Server: keeps the handlers ServedServer registers, by method."""

    def __init__(self):
        self.by_method: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.by_method.update({f"/{service}/{name}": handler for name, handler in handlers.items()})


def calls(call: Callable[[], object], count: int, awaited: bool = False) -> Callable[[], Awaitable[None]]:
    """A round: COUNT calls of CALL (each awaited, when it is async)."""

    async def round_() -> None:
        for _ in range(count):
            result = call()
            if awaited:
                await result  # type: ignore[misc]

    return round_


def stream(handler, request, context, count: int) -> Callable[[], Awaitable[None]]:
    """A round: one stream of COUNT requests through HANDLER, read to its end."""

    async def requests():
        for _ in range(count):
            yield request

    async def round_() -> None:
        async for _ in handler(requests(), context):
            pass

    return round_


async def cpu_us(rounds: dict[str, Callable[[], Awaitable[None]]], count: int) -> dict[str, float]:
    """Each round's least CPU µs per call (of this thread) over ROUNDS turns, the rounds taken in turn so that
    they share whatever else the machine does."""
    best = dict.fromkeys(rounds, float("inf"))
    for _ in range(ROUNDS):
        for name, round_ in rounds.items():
            start = time.thread_time()
            await round_()
            best[name] = min(best[name], (time.thread_time() - start) / count)
    return {name: 1e6 * seconds for name, seconds in best.items()}


async def measure(work: Path, count: int) -> dict[str, dict[str, float]]:
    folder = work / "models"
    folder.mkdir()
    (folder / "mlp.onnx").write_bytes(mlp())
    settings = load_settings(data_dir=work / "data", log_dir=work / "logs", auth="on", ort_intra_op_threads=1)
    configure_logging(settings.log_dir)  # the access lines go to "stdout" and the log file, as served
    cast(logging.StreamHandler, logging.getLogger().handlers[0]).setStream(open(work / "stdout", "w"))
    core = build_core(settings)
    await register_folder(core.registry, folder)
    token, key = new_key(["admin"], [])
    core.storage.metadata.create_key(key)

    rpcs = contract.rpcs((*SERVICES, *contract.PROBE_SERVICES))
    guard = Guard(Authenticator(core.storage.metadata.get_key, settings.auth_cache_seconds), rpcs)
    access = AccessLog()
    handlers = Handlers()
    served = ServedServer(handlers, rpcs, guard, access)  # type: ignore[arg-type]
    executor = ThreadPoolExecutor(settings.inference_threads)
    limits, in_flight = core.jobs.limits.tensors, settings.stream_max_in_flight
    engine = InferenceEngine(core.registry, executor, settings.inline_run_max_us / 1e6, core.aliases)
    servicer = InferenceServicer(engine, in_flight, limits)
    for add, served_by in (
        (inference_service_pb2_grpc.add_InferenceServiceServicer_to_server, servicer),
        (
            grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
            OipServicer(engine, core.is_ready, in_flight, limits),
        ),
    ):
        add(served_by, served)  # as `mds serve` registers them

    x = np.random.default_rng(0).standard_normal((1, 784)).astype(np.float32)
    predict = pb.PredictRequest(model="mlp", inputs=[from_array("x", x, raw=True)])
    infer = oip.ModelInferRequest(
        model_name="mlp",
        inputs=[oip.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=x.shape)],
        raw_input_contents=[x.tobytes()],
    )
    context: Any = Context(token)
    predict_handler: Any = handlers.by_method[PREDICT].unary_unary
    infer_handler: Any = handlers.by_method[MODEL_INFER].unary_unary
    stream_handler: Any = handlers.by_method["/mds.v1.InferenceService/PredictStream"].stream_stream
    for _ in range(300):  # the model loaded, its runs timed (so that they run inline), the key cached
        await predict_handler(predict, context)
        await infer_handler(infer, context)
    floor = floor_server.Floor(str(folder / "mlp.onnx"))

    loaded = await core.registry.load("mlp", 0)
    inputs = to_arrays(predict.inputs, limits)
    signature = Signature(loaded.record)
    names = signature.select(())
    prediction = await engine.predict("mlp", 0, inputs)
    fields = {"model": "mlp", "request_id": "", "version": 1}

    lines = itertools.count(1)

    def access_line() -> None:
        access.write({"method": PREDICT, **fields, "code": "OK", "duration_ms": 0.123})
        if next(lines) % 100 == 0:  # the batch a 0.1 s flush takes at 1,000 requests/s
            access.flush()

    def metric_points() -> None:
        metrics.observe_rpc(PREDICT, "mlp", "OK", 0.0005)
        metrics.observe_run("mlp", 1, None, 0.00005, 1)
        metrics.cache_event("hit")

    async def lookup() -> None:
        await core.registry.load("mlp", 0)

    def signature_checks() -> None:
        signature.check(inputs)
        signature.select(())

    async def guard_call() -> None:
        await guard(PREDICT, predict, context)

    measured = await cpu_us(
        {
            "auth": calls(guard_call, count, awaited=True),
            "access log": calls(access_line, count),
            "metrics": calls(metric_points, count),
            "lookup": calls(lookup, count, awaited=True),
            "signature checks": calls(signature_checks, count),
            "run (onnxruntime)": calls(lambda: loaded.session.run(names, inputs), count),
            "decode Predict": calls(lambda: to_arrays(predict.inputs, limits), count),
            "encode Predict": calls(lambda: encode_prediction(prediction, predict, pb.PredictResponse()), count),
            "decode ModelInfer": calls(lambda: input_arrays(infer, limits), count),
            "encode ModelInfer": calls(lambda: infer_response(infer, "mlp", 1, prediction.outputs), count),
            "Predict": calls(lambda: predict_handler(predict, context), count, awaited=True),
            "ModelInfer": calls(lambda: infer_handler(infer, context), count, awaited=True),
            "PredictStream": stream(stream_handler, predict, context, count),
            "floor Predict": calls(lambda: floor.Predict(predict, context), count, awaited=True),
            "floor PredictStream": stream(floor.PredictStream, predict, context, count),
            "engine.predict": calls(lambda: engine.predict("mlp", 0, inputs), count, awaited=True),
            "Predict unwrapped": calls(lambda: servicer.Predict(predict, context), count, awaited=True),
        },
        count,
    )
    shared = ("auth", "access log", "metrics", "lookup", "signature checks", "run (onnxruntime)")
    results: dict[str, dict[str, float]] = {}
    for call in ("Predict", "ModelInfer", "PredictStream"):
        floor_us = measured["floor PredictStream" if call == "PredictStream" else "floor Predict"]
        parts = {}
        if call != "PredictStream":  # its messages go through the same parts, but not through the wrapper
            parts = {name: measured[name] for name in shared}
            parts |= {"decode": measured[f"decode {call}"], "encode": measured[f"encode {call}"]}
            parts["glue (wrappers, contexts, coroutines)"] = measured[call] - sum(parts.values())
        results[call] = parts | {
            "MDS": measured[call],
            "floor": floor_us,
            "MDS over the floor": measured[call] - floor_us,
        }
    results["Predict"] |= {f"· {name} alone": measured[name] for name in ("engine.predict", "Predict unwrapped")}
    access.flush()
    executor.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="calls per round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mds-profile-") as work:
        results = asyncio.run(measure(Path(work), args.requests))
    print(f"CPU µs per request, least of {ROUNDS} rounds of {args.requests}:")
    print(f"  {'':40s} " + " ".join(f"{call:>13s}" for call in results))
    for name in results["Predict"]:
        print(
            f"  {name:40s} "
            + " ".join(f"{parts[name]:13.1f}" if name in parts else " " * 13 for parts in results.values())
        )


if __name__ == "__main__":
    main()
