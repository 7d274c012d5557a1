"""Workload (c) on a GPU (issue 16): onnxruntime in-process and MDS on CUDA, against MDS on the CPU.

    python bench/gpu.py [--providers cuda,cpu] [--models ocr-det,resnet] [--duration 5] [--batch 8] [--out DIR]

For each model (PP-OCRv4's text detector on one 3x160x160 image per request, as in workload (c); a generated
ResNet-50-sized convolution stack on 3x224x224 images): onnxruntime in-process on --providers at batch 1 and
at --batch, then, under ghz at --concurrency, MDS on --providers with dynamic batching off and on (up to --batch
images a run) and MDS on the CPU. Reports images/s, p50 and p99, and each MDS row on --providers over
in-process at the same batch: the target is MDS batched ≥ 0.8× in-process at --batch.
Writes results.json, results.md and the servers' logs (logs/) into --out ($OUT, else bench/results/gpu).

Where the first of --providers cannot start (no GPU, no driver), each row says what happened: "ran on" names
the provider that ran (cpu after a fallback, which only a list with cpu allows, as the default cuda,cpu does)
and the note says why; a list without cpu gets refused rows. The target counts only rows that ran on a GPU.
So on a CPU machine with onnxruntime-gpu installed, the defaults rehearse the whole flow.
"""

import argparse
import contextlib
import functools
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "scripts")]
import models  # noqa: E402
import run  # noqa: E402
import serving  # noqa: E402
from harness import PREDICT, REPO, Target, ghz, upload  # noqa: E402
from mds.v1 import inference_service_pb2 as pb  # noqa: E402
from mds.v1.model_service_pb2 import Batching  # noqa: E402
from mds_grpc.api.tensors import to_array  # noqa: E402
from mds_grpc.core.placement import GPU_PROVIDERS, parse_providers  # noqa: E402
from mds_grpc.core.runtime import ORT_NAMES, SHORT_NAMES  # noqa: E402

TARGET_RATIO = 0.8  # MDS batched over in-process at the same batch
TOLERANCE = 1e-2  # of the largest output: GPU kernels (TF32 convolutions) differ from run to run and from the CPU
WARM_UP_S = 2.0  # ghz load before each GPU point: the first run of each batch size picks its CUDA kernels
RESNET_STAGES = ((64, 6), (128, 8), (256, 8), (512, 9))  # (channels, 3x3 convolutions); each stage after the
# first opens with a stride-2 one


def resnet_sized() -> Path:
    """images[batch, 3, 224, 224] -> logits[batch, 1000]: a 7x7/2 stem convolution and a 3x3/2 max pool, the
    3x3 Conv+Relu stages of RESNET_STAGES at 56, 28, 14 and 7 px, a global average pool and a Gemm (26M fp32
    parameters, 3.5 GMAC per image, as ResNet-50 has 26M and 4.1). Written once into $MDS_CACHE/bench-models."""
    path = models.MODELS / "resnet-sized.onnx"
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    weights: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def conv(x: str, channels_in: int, channels_out: int, kernel: int, stride: int) -> str:
        n = len(nodes)
        scale = np.sqrt(2 / (channels_in * kernel * kernel))  # He: activations keep their size through ReLUs
        w = (rng.standard_normal((channels_out, channels_in, kernel, kernel), np.float32) * scale).astype(np.float32)
        bias = np.zeros(channels_out, np.float32)
        weights.extend([numpy_helper.from_array(w, f"w{n}"), numpy_helper.from_array(bias, f"b{n}")])
        pad = kernel // 2
        nodes.append(helper.make_node("Conv", [x, f"w{n}", f"b{n}"], [f"c{n}"], strides=[stride] * 2, pads=[pad] * 4))
        nodes.append(helper.make_node("Relu", [f"c{n}"], [f"r{n}"]))
        return f"r{n}"

    x = conv("images", 3, 64, 7, 2)
    nodes.append(helper.make_node("MaxPool", [x], ["pooled"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x, channels = "pooled", 64
    for stage, (width, count) in enumerate(RESNET_STAGES):
        for layer in range(count):
            x = conv(x, channels, width, 3, 2 if stage and not layer else 1)
            channels = width
    fc = (rng.standard_normal((channels, 1000), np.float32) / np.sqrt(channels)).astype(np.float32)
    weights += [numpy_helper.from_array(fc, "fc"), numpy_helper.from_array(np.zeros(1000, np.float32), "fc_b")]
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["features"]),
        helper.make_node("Gemm", ["features", "fc", "fc_b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "resnet-sized",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="mds-bench")
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path.with_suffix(".part")))
    path.with_suffix(".part").rename(path)
    return path


MODELS: dict[str, tuple[Callable[[], Path], tuple[int, ...]]] = {  # the model file, one image's shape
    "ocr-det": (models.ocr_detector, serving.HEAVY_SHAPE),
    "resnet": (resnet_sized, (1, 3, 224, 224)),
}


class Refused(Exception):
    """A target would not run the model on the providers asked."""


class InProcess:
    """onnxruntime in this process on PROVIDERS (short names, preferred first), as its users write it."""

    def __init__(self, path: Path, providers: tuple[str, ...]):
        if GPU_PROVIDERS & set(providers):
            ort.preload_dlls()  # CUDA and cuDNN from their PyPI packages
        self.session = ort.InferenceSession(str(path), providers=[ORT_NAMES[p] for p in providers])
        self.input = self.session.get_inputs()[0].name
        self.ran_on = SHORT_NAMES.get(self.session.get_providers()[0], "?")
        self.note = "" if self.ran_on == providers[0] else f"{providers[0]} did not start: fell back to {self.ran_on}"
        if self.note and self.ran_on not in providers:
            raise Refused(f"{self.note}, which {','.join(providers)} does not allow")

    def answer(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: x})[0]

    def load(self, x: np.ndarray, batch: int, duration: float) -> dict:
        """session.run of BATCH images in a loop for DURATION seconds, after a few runs to warm up."""
        feeds = {self.input: np.repeat(x, batch, axis=0)}
        for _ in range(3):
            self.session.run(None, feeds)
        seconds: list[float] = []
        start = time.perf_counter()
        while time.perf_counter() - start < duration:
            began = time.perf_counter()
            self.session.run(None, feeds)
            seconds.append(time.perf_counter() - began)
        p50, p99 = np.percentile(seconds, [50, 99]) * 1000
        return {
            "requests_per_s": len(seconds) * batch / (time.perf_counter() - start),
            "p50_ms": float(p50),
            "p99_ms": float(p99),
            "concurrency": 1,
            "ran_on": self.ran_on,
            "note": self.note,
        }


def fallbacks(log: Path, offset: int) -> list[str]:
    """The server's messages, from byte OFFSET of its log LOG on, about a provider that could not run a model."""
    with open(log, "rb") as handle:
        handle.seek(offset)
        lines = handle.read().decode(errors="replace").splitlines()
    messages = []
    for line in lines:
        with contextlib.suppress(ValueError, AttributeError):
            line = json.loads(line).get("message", line)
        if "cannot run the model" in line:
            messages.append(line)
    return messages


class Servers:
    """MDS servers by execution providers, each started once (a start that failed is not tried again)."""

    def __init__(self, bench: run.Bench, processes: int):
        self.bench, self.processes = bench, processes
        self.started: dict[str, Target | Exception] = {}

    def __call__(self, providers: str) -> Target:
        if providers not in self.started:
            env = {"MDS_EXECUTION_PROVIDERS": providers, "MDS_PROCESSES": str(self.processes)}
            label = "MDS on the CPU" if providers == "cpu" else "MDS"
            folder = "mds-" + providers.replace(",", "-")
            try:
                self.started[providers] = self.bench.server(
                    ("MDS", providers), lambda: self.bench.mds_server(folder, env, label)
                )
            except Exception as error:  # it did not start: every row on it says why
                self.started[providers] = error
        server = self.started[providers]
        if isinstance(server, Exception):
            raise server
        return server


def serve(target: Target, load: serving.Payloads, reference: np.ndarray, providers: tuple[str, ...], args) -> dict:
    """Upload LOAD's model to TARGET, check its answer against REFERENCE, then ghz: where it ran and how fast."""
    assert target.log is not None
    offset = target.log.stat().st_size
    model = upload(target, load.model, load.path, batching=load.batching)
    runs_on = list(model.execution_providers) or ["none"]  # the server's providers among those asked
    got = to_array(target.call(PREDICT, load.predict, pb.PredictResponse, timeout=600).outputs[0])
    difference, scale = float(np.max(np.abs(got - reference))), float(np.max(np.abs(reference)))
    if not difference <= TOLERANCE * scale + 1e-6:
        raise AssertionError(f"answers differ from in-process onnxruntime's by up to {difference:.3g} (of {scale:.3g})")
    fell_back = fallbacks(target.log, offset)
    ran_on = re.findall(r"trying (\w+)", fell_back[-1])[-1] if fell_back else runs_on[0]
    if GPU_PROVIDERS & set(providers):
        ghz(target, PREDICT, load.files[PREDICT], args.concurrency, min(WARM_UP_S, args.duration))
    row = ghz(target, PREDICT, load.files[PREDICT], args.concurrency, args.duration)
    note = fell_back[-1].split(": ", 1)[-1] if fell_back else ""
    if ran_on != providers[0] and not fell_back:
        note = f"this server has no {providers[0]}"
    return {**row, "ran_on": ran_on, "note": note, "max_difference": difference}


def reason(error: Exception) -> str:
    if isinstance(error, grpc.RpcError):
        return f"refused: {error.code().name}: {error.details()}"
    return f"{'refused' if isinstance(error, Refused) else type(error).__name__}: {error}"


def attempt(row: dict, measure: Callable[[], dict]) -> dict:
    """ROW with MEASURE's figures, or with what stopped it (a refusal, a failed start) as its note."""
    try:
        return {**measure(), **row}  # ghz names the server; the row names the target
    except Exception as error:
        print(f"{row['model']}, {row['target']}: {reason(error)}", file=sys.stderr, flush=True)
        return {**row, "note": reason(error)}


def measure(bench: run.Bench, servers: Servers, name: str, providers: tuple[str, ...], args) -> list[dict]:
    """One model's rows: in-process at batch 1 and --batch, MDS on PROVIDERS unbatched and batched, MDS on the CPU."""
    asked = ",".join(providers)
    base = {"model": name, "asked": asked}
    model_file, shape = MODELS[name]
    try:
        path = model_file()
    except Exception as error:
        return [{**base, "target": "(the model)", "note": f"not available: {reason(error)}"}]
    # An 8-bit image scaled to [0, 1): its bytes never hold "{{", which ghz would take for a template's start.
    x = (np.random.default_rng(0).integers(0, 256, shape) / 256).astype(np.float32)
    plain = serving.Payloads(bench.work, name, path, x)
    batched = serving.Payloads(
        bench.work,
        f"{name}-batched",
        path,
        x,
        Batching(max_batch_size=args.batch, max_queue_delay_us=args.queue_delay_us),
    )
    try:
        local: InProcess | Exception | None = InProcess(path, providers)
    except Exception as error:
        local = error

    def in_process(batch: int) -> dict:
        if isinstance(local, Exception):
            raise local
        assert local is not None
        return local.load(x, batch, bench.duration)

    rows = [
        attempt(
            {**base, "target": "onnxruntime in-process", "call": "session.run", "batch": batch},
            functools.partial(in_process, batch),
        )
        for batch in (1, args.batch)
    ]
    reference = local.answer(x) if isinstance(local, InProcess) else plain.want
    local = None  # its device memory goes before the servers take theirs

    def on_server(providers: str, load: serving.Payloads) -> dict:
        want = reference if providers == asked else plain.want
        return serve(servers(providers), load, want, parse_providers(providers), args)

    for server, load, target, batch in (
        (asked, plain, "MDS", 1),
        (asked, batched, f"MDS, dynamic batching ≤{args.batch}", f"≤{args.batch}"),
        ("cpu", plain, "MDS on the CPU", 1),
    ):
        rows.append(
            attempt(
                {**base, "asked": server, "target": target, "call": "Predict", "batch": batch},
                functools.partial(on_server, server, load),
            )
        )
    return rows


RATIO = "× in-process, same batch"
COLUMNS = [
    ("target", "target", ""),
    ("model", "model", ""),
    ("providers", "asked", ""),
    ("ran on", "ran_on", ""),
    ("batch", "batch", ""),
    ("concurrency", "concurrency", "d"),
    ("images/s", "requests_per_s", ",.0f"),
    ("p50 ms", "p50_ms", ".3f"),
    ("p99 ms", "p99_ms", ".3f"),
    ("server CPU µs/image", "cpu_us_per_request", ",.0f"),
    ("note", "note", ""),
]


def add_ratios(rows: list[dict], asked: str) -> None:
    """Each MDS row on ASKED over in-process at the same batch (unbatched: batch 1; batched: --batch)."""
    for row in rows:
        row["ratios"] = {}
        if not row["target"].startswith("MDS") or row["asked"] != asked or not row.get("requests_per_s"):
            continue
        batch = int(str(row["batch"]).lstrip("≤"))
        base = [r for r in rows if r["model"] == row["model"] and r["target"].startswith("onnxruntime")]
        base = [r for r in base if r["batch"] == batch and r.get("requests_per_s")]
        if base:
            row["ratios"][RATIO] = row["requests_per_s"] / base[0]["requests_per_s"]


def targets(rows: list[dict], asked: str, batch: int) -> list[dict]:
    """Per model: MDS batched on ASKED ≥ TARGET_RATIO× in-process at BATCH, counted only when both ran on a GPU."""
    checked = []
    for name in dict.fromkeys(r["model"] for r in rows):
        pair = [
            r
            for r in rows
            if r["model"] == name
            and r["asked"] == asked
            and (
                r["target"].startswith("MDS, dynamic")
                or (r["target"].startswith("onnxruntime") and r["batch"] == batch)
            )
        ]
        figures = [r["ratios"][RATIO] for r in pair if RATIO in r.get("ratios", {})]
        off_gpu = [r for r in pair if r.get("ran_on") not in GPU_PROVIDERS]
        why = f"{off_gpu[0]['target']}: {off_gpu[0].get('ran_on') or 'did not run'}" if off_gpu else ""
        checked.append(
            {
                "workload": "c",
                "target": f"{name}: MDS batched on {asked} ≥ {TARGET_RATIO}× in-process at batch {batch}",
                "figures": figures,
                "unit": "×",
                "met": None if off_gpu or not figures else all(f >= TARGET_RATIO for f in figures),
                "elsewhere": f"no GPU: {why}" if why else "",
            }
        )
    return checked


def machine() -> str:
    gpu = "no nvidia-smi"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        gpu = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip() or "no GPU listed"
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, GPU: {gpu}, Python {platform.python_version()}, "
        f"onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())})"
    )


def write(out: Path, settings: dict, rows: list[dict]) -> str:
    """results.json and results.md into OUT; returns the Markdown."""
    providers, batch = settings["providers"], settings["batch"]
    add_ratios(rows, providers)
    checked = targets(rows, providers, batch)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"run": settings, "rows": rows, "targets": checked}, indent=2))
    workload = run.Workload(
        f"(c) on {providers}: images/s; p50 and p99 per request under ghz at concurrency {settings['concurrency']} "
        "(MDS), per session.run (in-process)",
        lambda bench: rows,
        COLUMNS,
        "requests_per_s",
        [(RATIO, "")],
    )
    short = [{**r, "note": (r.get("note") or "")[:160].replace("|", "/").replace("\n", " ")} for r in rows]
    text = (
        f"Machine: {settings['machine']}; {settings['duration_s']:g} s per point; run {settings['started']}.\n\n"
        + run.markdown(short, workload)
        + "\n"
        + run.targets_markdown(checked)
    )
    (out / "results.md").write_text(text)
    return text


def keep_logs(work: Path, logs: Path) -> None:
    """Each server's log, from the run's temporary folder WORK into LOGS."""
    for log in work.glob("*/server.log"):
        logs.mkdir(parents=True, exist_ok=True)
        shutil.copy2(log, logs / f"{log.parent.name}.log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--providers",
        default="cuda,cpu",
        help="where the GPU rows run, preferred first (MDS_EXECUTION_PROVIDERS' names; default cuda,cpu: the "
        "nodes CUDA leaves, and the whole model where CUDA cannot start, run on the CPU, and the rows say so), "
        "e.g. tensorrt,cuda,cpu, or cuda, which refuses rather than falls back",
    )
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, among {', '.join(MODELS)}")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--batch", type=int, default=serving.HEAVY_BATCH, help="in-process batch, MDS's largest")
    parser.add_argument("--concurrency", type=int, default=serving.HEAVY_CONCURRENCY, help="ghz's requests at once")
    parser.add_argument("--queue-delay-us", type=int, default=serving.HEAVY_QUEUE_DELAY_US, help="MDS's batch wait")
    parser.add_argument("--processes", type=int, default=1, help="MDS's serving processes (MDS_PROCESSES)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT") or REPO / "bench" / "results" / "gpu"),
        help="where the results go ($OUT, else bench/results/gpu)",
    )
    args = parser.parse_args()
    try:
        providers = parse_providers(args.providers)
    except Exception as error:
        parser.error(str(error))
    chosen = args.models.split(",")
    if unknown := set(chosen) - set(MODELS):
        parser.error(f"unknown models {sorted(unknown)}; choose from {','.join(MODELS)}")
    settings = {
        "machine": machine(),
        "providers": ",".join(providers),
        "batch": args.batch,
        "concurrency": args.concurrency,
        "queue_delay_us": args.queue_delay_us,
        "processes": args.processes,
        "duration_s": args.duration,
        "started": time.strftime("%Y-%m-%d %H:%M"),
    }
    rows: list[dict] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # a time box's end: stop the servers, keep the logs
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mds-gpu-bench-")))
        bench = run.Bench(SimpleNamespace(smoke=False, duration=args.duration, no_peers=True), work, stack)
        servers = Servers(bench, args.processes)
        try:
            for name in chosen:
                start = time.monotonic()
                rows += measure(bench, servers, name, providers, args)
                print(f"{name}: {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
                text = write(args.out, settings, rows)  # what was measured stays when a time box ends the run
        finally:
            keep_logs(work, args.out / "logs")
    print(text)


if __name__ == "__main__":
    main()
