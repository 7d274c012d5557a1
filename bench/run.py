"""The benchmark suite: the same model and load generator against in-process onnxruntime,
the Python gRPC floor and MDS (mds.v1 Predict, PredictStream, V2 ModelInfer), side by side.
MDS runs with its production features on: access log, Prometheus metrics, API keys.

    python bench/run.py [--smoke] [--duration 10] [--out bench/results]

Writes results.json, results.md (req/s, p50/p99 latency, server CPU per request, ratios to
the floor) and results.png. Load comes from ghz (`scripts/install_go_tools.sh`).
"""

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from mds.oip import grpc_service_pb2 as oip
from mds.v1 import inference_service_pb2 as pb
from mds.v1 import model_service_pb2, model_service_pb2_grpc
from mds_grpc.api.tensors import from_array, to_array

sys.path.insert(0, str(Path(__file__).parent))
from models import mlp  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(os.environ.get("MDS_CACHE", Path.home() / ".cache" / "mds")) / "bin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_grpc(address: str) -> None:
    grpc.channel_ready_future(grpc.insecure_channel(address)).result(timeout=60)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Target:
    """A server under load: its process, and the gRPC call ghz makes to it."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict | None = None, api_key: str = ""):
        self.name, self.port, self.api_key = name, port, api_key
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self.address = f"127.0.0.1:{port}"
        self.process = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_for_grpc(self.address)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


def ghz(target: Target, call: str, payload: Path, concurrency: int, duration: float,
        stream_messages: int = 0) -> dict:
    argv = [str(BIN / "ghz"), "--insecure", "--protoset", str(REPO / "gen" / "mds.protoset"), "--call", call,
            "-B", str(payload), "-c", str(concurrency), "--connections", str(min(concurrency, 8)),
            "-z", f"{duration}s", "--duration-stop", "ignore", "-O", "json", "--count-errors"]
    if stream_messages:
        argv += ["--stream-call-count", str(stream_messages)]
    if target.api_key:
        argv += ["--metadata", json.dumps({"authorization": f"Bearer {target.api_key}"})]
    before = cpu_seconds(target.process.pid)
    report = json.loads(subprocess.run(argv + [target.address], capture_output=True, text=True, check=True).stdout)
    cpu = cpu_seconds(target.process.pid) - before
    # ghz times whole calls: for streams that is a stream of `stream_messages` requests, not one request.
    latencies = {} if stream_messages else {
        d["percentage"]: d["latency"] / 1e6 for d in report.get("latencyDistribution") or []}
    ok = report.get("statusCodeDistribution", {}).get("OK", 0)
    calls = report["count"]
    messages = calls * max(stream_messages, 1)
    return {"target": target.name, "call": call.rsplit("/", 1)[1], "concurrency": concurrency,
            "requests_per_s": messages / (report["total"] / 1e9), "p50_ms": latencies.get(50), "p99_ms": latencies.get(99),
            "cpu_us_per_request": 1e6 * cpu / max(messages, 1), "errors": calls - ok}


def in_process(model: bytes, x: np.ndarray, duration: float) -> dict:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < duration:
        session.run(None, {"x": x})
        count += 1
    seconds = time.perf_counter() - start
    return {"target": "onnxruntime in-process", "call": "session.run", "concurrency": 1,
            "requests_per_s": count / seconds, "p50_ms": 1000 * seconds / count, "p99_ms": None,
            "cpu_us_per_request": 1e6 * seconds / count, "errors": 0}


def check_outputs(target: Target, request: pb.PredictRequest, want: np.ndarray) -> None:
    """Every target must answer what in-process onnxruntime answers before its speed counts."""
    channel = grpc.insecure_channel(target.address)
    reply = channel.unary_unary("/mds.v1.InferenceService/Predict", request_serializer=pb.PredictRequest.SerializeToString,
                                response_deserializer=pb.PredictResponse.FromString)(
        request, timeout=30, metadata=target.metadata)
    np.testing.assert_array_equal(to_array(reply.outputs[0]), want)


def markdown(rows: list[dict], floor: dict[tuple, float]) -> str:
    lines = ["| target | call | concurrency | req/s | p50 ms | p99 ms | server CPU µs/req | × floor req/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        base = floor.get((r["call"] if r["call"] != "ModelInfer" else "Predict", r["concurrency"]))
        ratio = r["requests_per_s"] / base if base and r["target"] != "floor" else None
        lines.append(f"| {r['target']} | {r['call']} | {r['concurrency']} | {r['requests_per_s']:,.0f} | "
                     f"{fmt(r['p50_ms'], '.3f')} | {fmt(r['p99_ms'], '.3f')} | {fmt(r['cpu_us_per_request'], ',.0f')} | "
                     f"{fmt(ratio, '.2f')} |")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['target']}\n{r['call']} c={r['concurrency']}" for r in rows]
    figure, axes = plt.subplots(figsize=(max(8, len(rows) * 0.9), 5))
    axes.bar(range(len(rows)), [r["requests_per_s"] for r in rows], color="#3b7dd8")
    axes.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    axes.set_ylabel("requests / s")
    axes.set_yscale("log")
    axes.set_title("MLP 784-256-10, batch 1 (higher is better)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one short point per target (proves the harness)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    duration = 1.0 if args.smoke else args.duration
    concurrencies = [1] if args.smoke else [1, 8, 64]
    args.out.mkdir(parents=True, exist_ok=True)

    work = Path(tempfile.mkdtemp(prefix="mds-bench-"))
    model = mlp()
    (work / "mlp.onnx").write_bytes(model)
    x = np.random.default_rng(0).standard_normal((1, 784)).astype(np.float32)
    want = ort.InferenceSession(model).run(None, {"x": x})[0]
    request = pb.PredictRequest(model="mlp", inputs=[from_array("x", x, raw=True)])
    (work / "predict.bin").write_bytes(request.SerializeToString())
    v2 = oip.ModelInferRequest(model_name="mlp", inputs=[oip.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=[1, 784])], raw_input_contents=[x.tobytes()])
    (work / "infer.bin").write_bytes(v2.SerializeToString())

    floor_port, mds_port, metrics_port = free_port(), free_port(), free_port()
    mds_settings = ["--data-dir", str(work / "data"), "--log-dir", str(work / "logs")]
    created = subprocess.run([sys.executable, "-m", "mds_grpc", "keys", "create", "--scope", "admin", *mds_settings],
                             check=True, capture_output=True, text=True).stdout
    api_key = json.loads(created)["key"]
    floor = Target("floor", [sys.executable, str(REPO / "bench" / "floor_server.py"), str(floor_port),
                             str(work / "mlp.onnx")], floor_port)
    mds = Target("MDS", [sys.executable, "-m", "mds_grpc", "serve", "--grpc-port", str(mds_port), *mds_settings],
                 mds_port, env={"MDS_METRICS_PORT": str(metrics_port), "MDS_ORT_INTRA_OP_THREADS": "1",
                                "MDS_AUTH": "on"}, api_key=api_key)
    try:
        stub = model_service_pb2_grpc.ModelServiceStub(grpc.insecure_channel(mds.address))
        stub.UploadModel(iter([model_service_pb2.UploadModelRequest(header=model_service_pb2.ModelHeader(name="mlp")),
                               model_service_pb2.UploadModelRequest(chunk=model)]), metadata=mds.metadata)
        for target in (floor, mds):
            check_outputs(target, request, want)
        rows = [in_process(model, x, duration)]
        for c in concurrencies:
            rows.append(ghz(floor, "mds.v1.InferenceService/Predict", work / "predict.bin", c, duration))
            rows.append(ghz(mds, "mds.v1.InferenceService/Predict", work / "predict.bin", c, duration))
            rows.append(ghz(mds, "inference.GRPCInferenceService/ModelInfer", work / "infer.bin", c, duration))
        for streams in ([1] if args.smoke else [1, 8]):
            for target in (floor, mds):
                rows.append(ghz(target, "mds.v1.InferenceService/PredictStream", work / "predict.bin", streams,
                                duration, stream_messages=200))
    finally:
        floor.stop()
        mds.stop()
    floor_rates = {(r["call"], r["concurrency"]): r["requests_per_s"] for r in rows if r["target"] == "floor"}
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, onnxruntime {ort.__version__}"
    result = {"machine": machine, "duration_s": duration, "smoke": args.smoke, "rows": rows}
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    (args.out / "results.md").write_text(f"Machine: {machine}; {duration:g} s per point.\n\n" + markdown(rows, floor_rates))
    chart(rows, args.out / "results.png")
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
