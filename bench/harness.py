"""What every workload uses: servers under test, ghz, in-process onnxruntime, output checks, uploads."""

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from local_machine import BIN
from mds.oip import grpc_service_pb2 as oip
from mds.v1 import inference_service_pb2 as pb
from mds.v1 import model_service_pb2, model_service_pb2_grpc
from mds_grpc.api.tensors import to_array

REPO = Path(__file__).resolve().parents[1]
CHUNK_BYTES = 1 << 20
PREDICT = "mds.v1.InferenceService/Predict"
ALIAS = "prod"
PREDICT_VIA_ALIAS = f"{PREDICT}@{ALIAS}"  # Predict naming the model's alias instead of its version
PREDICT_STREAM = "mds.v1.InferenceService/PredictStream"
MODEL_INFER = "inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "inference.GRPCInferenceService/ModelStreamInfer"


def cpu_seconds(pid: int) -> float:
    """CPU time of the process and its live descendants (`mds serve --processes N` serves from children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") + sum(map(cpu_seconds, children))


def memory_kib(pid: int, field: str) -> int:
    """A /proc/PID/status figure such as VmRSS or VmHWM, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def helpers_ended(log: Path | None) -> list[dict]:
    """The "helper process ended" lines (peak_rss_mib, seconds...) of the server's JSON log LOG so far."""
    lines = map(json.loads, log.read_text().splitlines()) if log and log.exists() else []
    return [line for line in lines if line.get("message") == "helper process ended"]


def peak_memory(pids: dict[str, int], action: Callable[[], object], log: Path | None = None) -> dict:
    """Run ACTION: each process's peak RSS growth in MiB (VmHWM, reset just before, minus VmRSS just before),
    under its name in PIDS; "helper": the peak RSS in MiB of the helper process that checked a model meanwhile
    and "helper_seconds" its run time (from the server's log LOG; None when none did); "seconds": how long
    ACTION took."""
    helpers = len(helpers_ended(log))
    before = {name: memory_kib(pid, "VmRSS") for name, pid in pids.items()}
    for pid in pids.values():
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM, the peak RSS
    start = time.perf_counter()
    action()
    seconds = time.perf_counter() - start
    growth = {name: (memory_kib(pid, "VmHWM") - before[name]) / 1024 for name, pid in pids.items()}
    ended = [line for line in helpers_ended(log)[helpers:] if line["peak_rss_mib"] is not None]
    return {
        **growth,
        "helper": max((line["peak_rss_mib"] for line in ended), default=None),
        "helper_seconds": sum(line["seconds"] for line in ended) if ended else None,
        "seconds": seconds,
    }


class Target:
    """A server under load: its process, address and (for MDS) API key."""

    def __init__(
        self, name: str, argv: list[str], port: int, env: dict | None = None, api_key: str = "", log: Path | None = None
    ):
        self.name, self.argv, self.port, self.api_key = name, argv, port, api_key
        self.env = {**os.environ, **(env or {})}
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self.address = f"127.0.0.1:{port}"
        self.log = log
        self.start()

    def start(self) -> None:
        self.output = open(self.log, "ab") if self.log else None
        self.process = subprocess.Popen(
            self.argv, env=self.env, stdout=self.output or subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        self.channel = grpc.insecure_channel(self.address, options=[("grpc.max_receive_message_length", -1)])
        ready = grpc.channel_ready_future(self.channel)
        deadline = time.monotonic() + 120
        while not ready.done():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                tail = self.log.read_text()[-3000:] if self.log else ""
                raise RuntimeError(f"{self.name} did not start: {self.argv}\n{tail}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.channel.close()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)
        if self.output:
            self.output.close()

    def call(self, method: str, request, response_type, **kwargs):
        """One unary call of METHOD ("package.Service/Method", maybe with an "@alias" label) with this target's
        credentials."""
        stub = self.channel.unary_unary(
            f"/{method.split('@')[0]}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return stub(request, metadata=self.metadata, **kwargs)


def ghz(target: Target, call: str, payload: Path, concurrency: int, duration: float, stream_messages: int = 0) -> dict:
    """Load from ghz for `duration` seconds: req/s, latency percentiles, the server's CPU per request."""
    argv = [
        str(BIN / "ghz"),
        "--insecure",
        "--protoset",
        str(REPO / "gen" / "mds.protoset"),
        "--call",
        call.split("@")[0],
        "-B",
        str(payload),
        "-c",
        str(concurrency),
        "--connections",
        str(min(concurrency, 8)),
        "-z",
        f"{duration}s",
        "--duration-stop",
        "wait",
        "-O",
        "json",
        "--count-errors",
    ]
    if stream_messages:
        argv += ["--stream-call-count", str(stream_messages)]
    if target.api_key:
        argv += ["--metadata", json.dumps({"authorization": f"Bearer {target.api_key}"})]
    before = cpu_seconds(target.process.pid)
    report = json.loads(subprocess.run(argv + [target.address], capture_output=True, text=True, check=True).stdout)
    cpu = cpu_seconds(target.process.pid) - before
    # ghz times whole calls: for streams that is a stream of `stream_messages` requests, not one request.
    latencies = (
        {}
        if stream_messages
        else {d["percentage"]: d["latency"] / 1e6 for d in report.get("latencyDistribution") or []}
    )
    ok = report.get("statusCodeDistribution", {}).get("OK", 0)
    calls = report["count"]
    messages = calls * max(stream_messages, 1)
    return {
        "target": target.name,
        "call": call.rsplit("/", 1)[1],
        "concurrency": concurrency,
        "requests_per_s": messages / (report["total"] / 1e9),
        "p50_ms": latencies.get(50),
        "p99_ms": latencies.get(99),
        "cpu_us_per_request": 1e6 * cpu / max(messages, 1),
        "errors": calls - ok,
    }


def session(model: bytes | Path) -> ort.InferenceSession:
    """An onnxruntime session as every server here runs it: CPU, one intra-op thread."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        model if isinstance(model, bytes) else str(model), options, providers=["CPUExecutionProvider"]
    )


def in_process(model: bytes | Path, feeds: dict[str, np.ndarray], duration: float) -> dict:
    """session.run in a loop for `duration` seconds; a request is one row of the batch fed."""
    runner = session(model)
    rows = len(next(iter(feeds.values())))
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < duration:
        runner.run(None, feeds)
        count += 1
    seconds = time.perf_counter() - start
    name = "onnxruntime in-process" + (f" (batch {rows})" if rows > 1 else "")
    return {
        "target": name,
        "call": "session.run",
        "concurrency": 1,
        "requests_per_s": count * rows / seconds,
        "p50_ms": 1000 * seconds / count,
        "p99_ms": None,
        "cpu_us_per_request": 1e6 * seconds / (count * rows),
        "errors": 0,
    }


def v2_outputs(reply: oip.ModelInferResponse) -> list[np.ndarray]:
    """A V2 reply's FP32 outputs, whether they came as raw_output_contents or typed contents."""
    return [
        np.frombuffer(reply.raw_output_contents[i], "<f4").reshape(o.shape)
        if reply.raw_output_contents
        else np.array(o.contents.fp32_contents, np.float32).reshape(o.shape)
        for i, o in enumerate(reply.outputs)
    ]


def check_outputs(target: Target, call: str, request, want: np.ndarray) -> None:
    """Every target must answer what in-process onnxruntime answers before its speed counts: to the last few
    bits, as a MatMul on weights mapped from their file (MDS's big models, until their prepacked copy is in
    use) sums in another order than one on prepacked weights."""
    if call in (PREDICT, PREDICT_VIA_ALIAS):
        got = to_array(target.call(call, request, pb.PredictResponse, timeout=60).outputs[0])
    else:
        got = v2_outputs(target.call(call, request, oip.ModelInferResponse, timeout=60))[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{target.name} {call}")


def upload(
    target: Target,
    name: str,
    path: Path,
    side_files: tuple[str, ...] = (),
    batching: model_service_pb2.Batching | None = None,
) -> model_service_pb2.Model:
    """UploadModel of PATH and its external-data SIDE_FILES (next to it), in 1 MiB chunks read from disk."""
    header = model_service_pb2.ModelHeader(
        name=name,
        batching=batching,
        external_files=[
            model_service_pb2.ModelFile(path=s, size_bytes=(path.parent / s).stat().st_size) for s in side_files
        ],
    )

    def requests():
        yield model_service_pb2.UploadModelRequest(header=header)
        for location in [None, *side_files]:
            with open(path if location is None else path.parent / location, "rb") as handle:
                while chunk := handle.read(CHUNK_BYTES):
                    yield (
                        model_service_pb2.UploadModelRequest(chunk=chunk)
                        if location is None
                        else model_service_pb2.UploadModelRequest(
                            file_chunk=model_service_pb2.FileChunk(path=location, data=chunk)
                        )
                    )

    return model_service_pb2_grpc.ModelServiceStub(target.channel).UploadModel(requests(), metadata=target.metadata)


def set_alias(target: Target, name: str, version: int) -> None:
    """Point ALIAS at VERSION of NAME."""
    request = model_service_pb2.SetAliasRequest(model=name, alias=ALIAS, version=version)
    model_service_pb2_grpc.ModelServiceStub(target.channel).SetAlias(request, metadata=target.metadata, timeout=60)
