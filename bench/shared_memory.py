"""Memory (PSS) and throughput of `mds serve --processes N` with the 1 GiB external-data model in every process.

    python bench/shared_memory.py [--processes 2] [--batch 1] [--seconds 10] [--rounds 5] [--work DIR]

Uploads workload (d)'s model (models.big_model: x[batch, 8192] @ W[8192, 32768], W in big.onnx.data) once
into an embedded data folder. For each way of loading it (prepacked: MDS_SHARED_WEIGHTS_MIN_BYTES above its
size, each process with a copy of its own; shared: the default, weights mapped from the stored file), starts
`mds serve` with 1 and with --processes serving processes, one server at a time, predicts over fresh
connections until every process has answered (a prediction reads every weight), and sums the PSS of the
serving processes (/proc/PID/smaps_rollup); also the supervisor's PSS and whether it maps onnxruntime or gRPC.
Then runs both ways' servers at once and measures them in turns (a predict loop over two connections per
process, --batch rows, one intra-op thread), --rounds turns of --seconds each: medians and their ratio.
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "scripts")]
import models  # noqa: E402
from harness import Target, upload  # noqa: E402
from local_machine import free_port  # noqa: E402
from mds.v1 import inference_service_pb2 as pb  # noqa: E402
from mds.v1 import inference_service_pb2_grpc  # noqa: E402
from mds_grpc.api.tensors import from_array  # noqa: E402

MODEL_NAME = "big"
WAYS = {"prepacked": {"MDS_SHARED_WEIGHTS_MIN_BYTES": str(1 << 62)}, "shared": {}}
HEAVY_LIBRARIES = ("onnxruntime", "cygrpc")


def smaps_mib(pid: int) -> dict[str, float]:
    """Pss, Pss_Anon and Pss_File of a process, in MiB."""
    lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    figures = {p[0].rstrip(":"): int(p[1]) / 1024 for p in map(str.split, lines) if len(p) == 3 and p[2] == "kB"}
    return {key: figures[key] for key in ("Pss", "Pss_Anon", "Pss_File")}


def log_names(processes: int) -> list[str]:
    return ["mds.log"] if processes == 1 else [f"mds-{i}.log" for i in range(processes)]


def predicted(log: Path) -> bool:
    """Whether the serving process writing LOG has answered a Predict (its access log says so)."""
    lines = log.read_text().splitlines() if log.exists() else []
    return any(json.loads(line).get("method", "").endswith("/Predict") for line in lines)


def serving_pids(target: Target, logs: Path, processes: int) -> list[int]:
    if processes == 1:
        return [target.process.pid]
    lines = map(json.loads, (logs / "mds.log").read_text().splitlines())
    return next(line["pids"] for line in lines if line.get("message") == "serving processes started")


def predict(channel: grpc.Channel, request: pb.PredictRequest) -> None:
    inference_service_pb2_grpc.InferenceServiceStub(channel).Predict(request, timeout=600)


def predict_new(address: str, request: pb.PredictRequest) -> None:
    """One prediction over a connection of its own."""
    with new_channel(address) as channel:
        predict(channel, request)


def new_channel(address: str) -> grpc.Channel:
    """A channel with a connection of its own, which the kernel hands to any of the serving processes."""
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1)]
    return grpc.insecure_channel(address, options=options)


def load_everywhere(target: Target, logs: Path, processes: int, request: pb.PredictRequest) -> None:
    """Predict over fresh connections until every serving process has answered one (so each has loaded it)."""
    for _ in range(200):
        if all(predicted(logs / name) for name in log_names(processes)):
            return
        predict_new(target.address, request)
        time.sleep(0.2)  # the access log is written in batches
    raise SystemExit(f"error: not every serving process answered: {log_names(processes)}")


def throughput(address: str, connections: int, request: pb.PredictRequest, seconds: float) -> float:
    """Predictions per second from CONNECTIONS client threads, each with a connection of its own."""
    counts = [0] * connections
    ready, start = threading.Barrier(connections + 1), threading.Event()
    window: list[float] = []

    def loop(index: int) -> None:
        with new_channel(address) as channel:
            predict(channel, request)  # connected before the clock starts
            ready.wait()
            start.wait()
            while time.monotonic() < window[1]:
                predict(channel, request)
                counts[index] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    ready.wait()
    window[:] = [time.monotonic(), time.monotonic() + seconds]
    start.set()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.monotonic() - window[0])


def maps_heavy(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return [library for library in HEAVY_LIBRARIES if library in maps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10, help="length of one turn of the predict loop")
    parser.add_argument("--rounds", type=int, default=5, help="turns of each way's predict loop")
    parser.add_argument("--work", type=Path, help="folder for the data folder (default: a temporary one)")
    args = parser.parse_args()
    work = (args.work or Path(tempfile.mkdtemp(prefix="mds-shared-"))).resolve()
    big = models.big_model()
    env = {
        "MDS_DATA_DIR": str(work / "data"),
        "MDS_ORT_INTRA_OP_THREADS": "1",
        "MDS_WEBSOCKET_PORT": "0",
        "MDS_METRICS_PORT": "0",
        "MDS_DRAIN_SECONDS": "0",
        "MDS_PRELOAD_MODELS": "false",
        "MDS_AUTH": "off",
    }
    port = free_port()
    argv = [sys.executable, "-m", "mds_grpc", "serve", "--grpc-port", str(port)]
    if not (work / "data").exists():
        target = Target("MDS", argv, port, env={**env, "MDS_LOG_DIR": str(work / "upload-logs"), "MDS_PROCESSES": "1"})
        upload(target, MODEL_NAME, big, (models.BIG_DATA,))
        target.stop()
    x = np.random.default_rng(0).standard_normal((args.batch, 8192), np.float32)
    request = pb.PredictRequest(model=MODEL_NAME, inputs=[from_array("x", x, raw=True)])

    def start(way: str, processes: int) -> tuple[Target, Path]:
        """`mds serve` loading the model WAY, with the model loaded in each of its PROCESSES."""
        logs = work / f"logs-{way}-{processes}"
        shutil.rmtree(logs, ignore_errors=True)  # from an earlier run on the same --work
        run_env = {**env, **WAYS[way], "MDS_LOG_DIR": str(logs), "MDS_PROCESSES": str(processes)}
        port = free_port()
        target = Target("MDS", [*argv[:-1], str(port)], port, env=run_env)
        load_everywhere(target, logs, processes, request)
        return target, logs

    rows: list[dict[str, Any]] = []
    for way in WAYS:  # one server at a time: each is the only one mapping the stored weights
        for processes in sorted({1, args.processes}):
            target, logs = start(way, processes)
            try:
                memory = [smaps_mib(pid) for pid in serving_pids(target, logs, processes)]
                row: dict[str, Any] = {key: sum(m[key] for m in memory) for key in ("Pss", "Pss_Anon", "Pss_File")}
                row |= {"way": way, "processes": processes}
                if processes > 1:
                    pid = target.process.pid
                    row |= {"supervisor": smaps_mib(pid)["Pss"], "maps": maps_heavy(pid)}
                rows.append(row)
                print(row, flush=True)
            finally:
                target.stop()
    # Throughput: both ways at once, measured in turns, so that a busy machine weighs on both alike.
    servers = {way: start(way, args.processes)[0] for way in WAYS}
    rates: dict[str, list[float]] = {way: [] for way in WAYS}
    try:
        for _ in range(args.rounds):
            for way, target in servers.items():
                rates[way].append(throughput(target.address, 2 * args.processes, request, args.seconds))
            print(rates, flush=True)
    finally:
        for target in servers.values():
            target.stop()
    print("\n| weights | serving processes | PSS MiB (anon + file) | × one process | supervisor |")
    print("|---|---:|---:|---:|---|")
    for row in rows:
        one = next(r for r in rows if r["way"] == row["way"] and r["processes"] == 1)
        supervisor = (
            f"{row['supervisor']:.0f} MiB, maps {', '.join(row['maps']) or 'neither onnxruntime nor gRPC'}"
            if "supervisor" in row
            else "–"
        )
        print(
            f"| {row['way']} | {row['processes']} "
            f"| {row['Pss']:,.0f} ({row['Pss_Anon']:,.0f} + {row['Pss_File']:,.0f}) "
            f"| {row['Pss'] / one['Pss']:.2f}× | {supervisor} |"
        )
    medians = {way: statistics.median(rates[way]) for way in WAYS}
    print(
        f"\n{args.processes} serving processes, batch {args.batch}, one intra-op thread, "
        f"{2 * args.processes} connections: median predictions/s over {args.rounds} turns of {args.seconds:.0f} s: "
        + ", ".join(f"{way} {rate:.2f}" for way, rate in medians.items())
        + f"; shared / prepacked {medians['shared'] / medians['prepacked']:.2f}×"
    )


if __name__ == "__main__":
    main()
