"""(f) Restart → first prediction, on its own: MDS on its embedded storage against the floor started the same way.

    python bench/cold_start.py MODEL.onnx [--side FILE ...] [--shape 1,3,160,160] [--runs 5] [--work DIR]

Uploads MODEL (with its external-data SIDE files) once into a data folder under --work, then, RUNS times in
turn: starts `mds serve` on that folder and times until its first Predict is answered; starts the floor
(bench/floor_server.py: a fresh Python process that imports grpc and onnxruntime and loads the same file)
and times the same. Both get the same client, which retries connecting every 10 ms, and one intra-op thread.
Both start from compiled bytecode (under --work), as an installed package does. Prints each run and the medians.
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "scripts")]
from harness import REPO, Target, upload  # noqa: E402
from local_machine import free_port  # noqa: E402
from mds.v1 import inference_service_pb2 as pb  # noqa: E402
from mds.v1 import inference_service_pb2_grpc  # noqa: E402
from mds_grpc.api.tensors import from_array, to_array  # noqa: E402

MODEL_NAME = "cold"
RETRY_EVERY_10_MS = [
    ("grpc.initial_reconnect_backoff_ms", 10),
    ("grpc.min_reconnect_backoff_ms", 10),
    ("grpc.max_reconnect_backoff_ms", 10),
    ("grpc.max_receive_message_length", -1),
]


def mds_env(data: Path) -> dict[str, str]:
    """The embedded default (no MongoDB, S3 or Redis) on DATA, without the WebSocket port the floor lacks."""
    return {
        "MDS_DATA_DIR": str(data),
        "MDS_LOG_DIR": str(data.parent / "logs"),
        "MDS_ORT_INTRA_OP_THREADS": "1",
        "MDS_WEBSOCKET_PORT": os.environ.get("MDS_WEBSOCKET_PORT", "0"),
        "MDS_DRAIN_SECONDS": "0",
    }


def mds_argv(port: int) -> list[str]:
    return [sys.executable, "-m", "mds_grpc", "serve", "--grpc-port", str(port)]


def floor_argv(port: int, model: Path) -> list[str]:
    return [sys.executable, str(REPO / "bench" / "floor_server.py"), str(port), str(model)]


def from_bytecode(folder: Path) -> dict[str, str]:
    """Settings under which a server starts from compiled bytecode (kept in FOLDER), as an installed package does,
    even where PYTHONDONTWRITEBYTECODE is set: the first start writes it, so time the ones after."""
    return {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": str(folder)}


def first_prediction(
    argv: list[str],
    env: dict[str, str],
    port: int,
    request: pb.PredictRequest,
    metadata: tuple[tuple[str, str], ...] | None = None,
    want: np.ndarray | None = None,
) -> float:
    """Seconds from starting ARGV to the answer of its first Predict (sent with METADATA); the server is stopped
    after. WANT, when given, is the first output the answer must hold (checked after the clock stops)."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=RETRY_EVERY_10_MS) as channel:
            stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
            reply = stub.Predict(request, metadata=metadata, wait_for_ready=True, timeout=600)
        seconds = time.perf_counter() - start
        if want is not None:
            np.testing.assert_allclose(
                to_array(reply.outputs[0]), want, rtol=1e-5, atol=1e-5, err_msg=f"{argv} first Predict"
            )
        return seconds
    finally:
        process.send_signal(signal.SIGTERM)
        if process.wait(60) not in (0, -signal.SIGTERM):  # the floor has no handler for it
            raise RuntimeError(f"{argv} exited {process.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--side", nargs="*", default=[], help="external-data files next to MODEL")
    parser.add_argument("--shape", default="1,3,160,160", help="the fp32 input's shape")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--work", type=Path, help="folder for the data folder (default: a temporary one)")
    args = parser.parse_args()
    work = (args.work or Path(tempfile.mkdtemp(prefix="mds-cold-"))).resolve()
    args.model = args.model.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(from_bytecode(work / "pycache"))
    os.chdir(work)  # `python -m` puts the working folder first on sys.path: PYTHONPATH picks the code
    data = work / "data"
    port = free_port()
    env = mds_env(data)
    if not data.exists():
        target = Target("MDS", mds_argv(port), port, env=env, log=work / "upload.log")
        upload(target, MODEL_NAME, args.model, tuple(args.side))
        target.stop()
    x = np.ones([int(d) for d in args.shape.split(",")], np.float32)
    request = pb.PredictRequest(model=MODEL_NAME, inputs=[from_array(_input_name(args.model), x, raw=True)])
    times: dict[str, list[float]] = {"MDS": [], "floor": []}
    for run in range(args.runs + 1):  # the first, a warm-up, writes the bytecode and fills the page cache
        mds = first_prediction(mds_argv(port), env, port, request)
        floor = first_prediction(floor_argv(port, args.model), {}, port, request)
        print(f"run {run or 'warm-up'}: MDS {mds:.3f} s, floor {floor:.3f} s", flush=True)
        if run:
            times["MDS"].append(mds)
            times["floor"].append(floor)
    mds, floor = (statistics.median(times[k]) for k in ("MDS", "floor"))
    ratios = [m / f for m, f in zip(times["MDS"], times["floor"], strict=True)]
    print(f"median: MDS {mds:.3f} s, floor {floor:.3f} s; MDS / floor {statistics.median(ratios):.2f}x (pairwise)")


def _input_name(model: Path) -> str:
    import onnx

    return onnx.load(str(model), load_external_data=False).graph.input[0].name


if __name__ == "__main__":
    main()
