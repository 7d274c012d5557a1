"""Memory (PSS) and throughput of `mds serve --processes N` with the 1 GiB external-data model in every process.

    python bench/shared_memory.py [--processes 2] [--batch 1 [8 ...]] [--seconds 10] [--rounds 5] [--work DIR]

Uploads workload (d)'s model (models.big_model: x[batch, 8192] @ W[8192, 32768], W in big.onnx.data) once
into an embedded data folder. For each way of loading it (prepacked: MDS_SHARED_WEIGHTS_MIN_BYTES above its
size, each process with a copy of its own; shared: the default, weights mapped from the stored file), starts
`mds serve` with 1 and with --processes serving processes, one server at a time, predicts over fresh
connections until every process has answered (a prediction reads every weight) and each serves from its final
session (`settle`), and sums the PSS of the serving processes (/proc/PID/smaps_rollup); also the supervisor's
PSS and whether it maps onnxruntime or gRPC. Then runs both ways' servers at once and measures them in turns
(a predict loop over two connections per process, --batch rows, one intra-op thread), --rounds turns of
--seconds each at each batch size: medians and their ratio. `measure` does it all; workload (g) of
bench/run.py calls it too.
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
import onnx

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "scripts")]
import models  # noqa: E402
from harness import Target, upload  # noqa: E402
from local_machine import free_port  # noqa: E402
from mds.v1 import inference_service_pb2 as pb  # noqa: E402
from mds.v1 import inference_service_pb2_grpc  # noqa: E402
from mds_grpc.api.tensors import from_array  # noqa: E402

MODEL_NAME = "big"
HEAVY_LIBRARIES = ("onnxruntime", "cygrpc")


def smaps_mib(pid: int) -> dict[str, float]:
    """Pss, Pss_Anon and Pss_File of a process, in MiB."""
    lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    figures = {p[0].rstrip(":"): int(p[1]) / 1024 for p in map(str.split, lines) if len(p) == 3 and p[2] == "kB"}
    return {key: figures[key] for key in ("Pss", "Pss_Anon", "Pss_File")}


def log_names(processes: int) -> list[str]:
    return ["mds.log"] if processes == 1 else [f"mds-{i}.log" for i in range(processes)]


def predicted(log: Path) -> int:
    """How many Predicts the serving process writing LOG has answered (its access log says so)."""
    lines = log.read_text().splitlines() if log.exists() else []
    return sum(json.loads(line).get("method", "").endswith("/Predict") for line in lines)


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
    """Predict over fresh connections until every serving process has answered one more (so each has loaded
    the model, or read every weight of the session it now runs)."""
    before = {name: predicted(logs / name) for name in log_names(processes)}
    for _ in range(200):
        if all(predicted(logs / name) > before[name] for name in log_names(processes)):
            return
        predict_new(target.address, request)
        time.sleep(0.2)  # the access log is written in batches
    raise RuntimeError(f"not every serving process answered: {log_names(processes)}")


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


def settle(logs: Path, processes: int) -> None:
    """Wait until each of the PROCESSES serving processes (logging into LOGS, `log_names`) uses its final
    session for the model, so that memory and speed are measured on what serves from then on: shared weights
    switch to the host's prepacked copy (MDS_PREPACKED_COPIES), made meanwhile in a helper process."""
    if wait_for_copies([logs / name for name in log_names(processes)]):
        raise SystemExit(f"error: no prepacked copy (see {logs})")


def wait_for_copies(logs: list[Path], seconds: float = 900) -> int:
    """Wait until every switch to a prepacked copy that the servers' LOGS announce has ended; how many failed.
    A log's lines are written before the request that started the load is answered."""
    deadline = time.monotonic() + seconds
    while True:
        lines = [json.loads(line) for log in logs if log.exists() for line in log.read_text().splitlines()]
        switches = sum(line["message"] == "switching to a prepacked copy" for line in lines)
        switched = sum(line["message"] == "prepacked weights in use" and "seconds" in line for line in lines)
        failed = sum(line["message"] == "model keeps its own weights: no prepacked copy" for line in lines)
        if switched + failed >= switches:
            return failed
        if time.monotonic() > deadline:
            raise RuntimeError(f"the servers did not switch to their prepacked copies in {seconds:.0f} s: {logs}")
        time.sleep(0.5)


def ways(shared_min_bytes: int | None = None) -> dict[str, dict[str, str]]:
    """Each way's settings: prepacked, every process with a copy of its own (MDS_SHARED_WEIGHTS_MIN_BYTES above
    the model's size); shared, weights mapped from the stored file (the default, or from SHARED_MIN_BYTES of
    external data, for a model under the default's 64 MiB)."""
    shared = {} if shared_min_bytes is None else {"MDS_SHARED_WEIGHTS_MIN_BYTES": str(shared_min_bytes)}
    return {"prepacked": {"MDS_SHARED_WEIGHTS_MIN_BYTES": str(1 << 62)}, "shared": shared}


def measure(
    work: Path,
    model: Path,
    processes: int = 2,
    batches: tuple[int, ...] = (1,),
    seconds: float = 10,
    rounds: int = 5,
    shared_min_bytes: int | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """MODEL (models.big_model's x[batch, rows] @ W, W in its external-data file) uploaded once into WORK/data,
    then served each way (`ways`) by 1 and by PROCESSES serving processes, one server at a time: a row per
    server with the serving processes' summed PSS (pss_mib, pss_anon_mib, pss_file_mib), times_one_process,
    and for more than one process the supervisor's PSS and which of onnxruntime and gRPC it maps. Then both
    ways' servers with PROCESSES processes at once, measured in turns, ROUNDS turns of SECONDS at each of
    BATCHES rows per request: a row per way and batch with each turn's predictions/s, their median and, for
    shared, shared_over_prepacked. Progress goes to stderr."""
    env = {
        "MDS_DATA_DIR": str(work / "data"),
        "MDS_ORT_INTRA_OP_THREADS": "1",
        "MDS_WEBSOCKET_PORT": "0",
        "MDS_METRICS_PORT": "0",
        "MDS_DRAIN_SECONDS": "0",
        "MDS_PRELOAD_MODELS": "false",
        "MDS_AUTH": "off",
    }
    settings = ways(shared_min_bytes)

    def argv(port: int) -> list[str]:
        return [sys.executable, "-m", "mds_grpc", "serve", "--grpc-port", str(port)]

    if not (work / "data").exists():
        port = free_port()
        run_env = {**env, "MDS_LOG_DIR": str(work / "upload-logs"), "MDS_PROCESSES": "1"}
        target = Target("MDS", argv(port), port, env=run_env)
        upload(target, MODEL_NAME, model, (models.BIG_DATA,))
        target.stop()
    features = onnx.load(str(model), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[1].dim_value
    rng = np.random.default_rng(0)
    requests = {
        batch: pb.PredictRequest(
            model=MODEL_NAME, inputs=[from_array("x", rng.standard_normal((batch, features), np.float32), raw=True)]
        )
        for batch in batches
    }

    def start(way: str, processes: int) -> tuple[Target, Path]:
        """`mds serve` loading the model WAY, with the model loaded in each of its PROCESSES."""
        logs = work / f"logs-{way}-{processes}"
        shutil.rmtree(logs, ignore_errors=True)  # from an earlier run on the same work folder
        run_env = {**env, **settings[way], "MDS_LOG_DIR": str(logs), "MDS_PROCESSES": str(processes)}
        port = free_port()
        target = Target("MDS", argv(port), port, env=run_env)
        try:
            load_everywhere(target, logs, processes, requests[batches[0]])
            settle(logs, processes)
            load_everywhere(target, logs, processes, requests[batches[0]])  # the pages of what it settled on
        except BaseException:
            target.stop()
            raise
        return target, logs

    memory: list[dict[str, Any]] = []
    servers: dict[str, Target] = {}  # with PROCESSES processes, for the throughput
    kept = (list(settings)[-1], processes)  # the last server measured stays for the throughput
    try:
        for way in settings:  # one server at a time: each is the only one mapping the stored weights
            for count in sorted({1, processes}):
                target, logs = start(way, count)
                if (way, count) == kept:
                    servers[way] = target
                try:
                    figures = [smaps_mib(pid) for pid in serving_pids(target, logs, count)]
                    row: dict[str, Any] = {"way": way, "processes": count}
                    row |= {
                        f"{key.lower()}_mib": sum(f[key] for f in figures) for key in ("Pss", "Pss_Anon", "Pss_File")
                    }
                    if count > 1:
                        pid = target.process.pid
                        row |= {"supervisor_pss_mib": smaps_mib(pid)["Pss"], "supervisor_maps": maps_heavy(pid)}
                    memory.append(row)
                    print(row, file=sys.stderr, flush=True)
                finally:
                    if (way, count) != kept:
                        target.stop()
        # Throughput: both ways at once, measured in turns, so that a busy machine weighs on both alike.
        for way in settings:
            if way not in servers:
                servers[way] = start(way, processes)[0]
        rates: dict[tuple[int, str], list[float]] = {(batch, way): [] for batch in batches for way in settings}
        for batch in batches:
            for _ in range(rounds):
                for way in settings:
                    rates[batch, way].append(throughput(servers[way].address, 2 * processes, requests[batch], seconds))
                print({f"batch {batch} {way}": rates[batch, way] for way in settings}, file=sys.stderr, flush=True)
    finally:
        for target in servers.values():
            target.stop()
    for row in memory:
        one = next(r for r in memory if r["way"] == row["way"] and r["processes"] == 1)
        row["times_one_process"] = row["pss_mib"] / one["pss_mib"]
    speed: list[dict[str, Any]] = [
        {
            "way": way,
            "processes": processes,
            "batch": batch,
            "connections": 2 * processes,
            "turns": turns,
            "predictions_per_s": statistics.median(turns),
        }
        for (batch, way), turns in rates.items()
    ]
    for row in speed:
        if row["way"] == "shared":
            prepacked = next(r for r in speed if r["way"] == "prepacked" and r["batch"] == row["batch"])
            row["shared_over_prepacked"] = row["predictions_per_s"] / prepacked["predictions_per_s"]
    return memory, speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="rows per request (one or more)")
    parser.add_argument("--seconds", type=float, default=10, help="length of one turn of the predict loop")
    parser.add_argument("--rounds", type=int, default=5, help="turns of each way's predict loop")
    parser.add_argument("--work", type=Path, help="folder for the data folder (default: a temporary one)")
    args = parser.parse_args()
    work = (args.work or Path(tempfile.mkdtemp(prefix="mds-shared-"))).resolve()
    memory, speed = measure(work, models.big_model(), args.processes, tuple(args.batch), args.seconds, args.rounds)
    print("\n| weights | serving processes | PSS MiB (anon + file) | × one process | supervisor |")
    print("|---|---:|---:|---:|---|")
    for row in memory:
        supervisor = (
            f"{row['supervisor_pss_mib']:.0f} MiB, maps "
            + (", ".join(row["supervisor_maps"]) or "neither onnxruntime nor gRPC")
            if "supervisor_pss_mib" in row
            else "–"
        )
        print(
            f"| {row['way']} | {row['processes']} "
            f"| {row['pss_mib']:,.0f} ({row['pss_anon_mib']:,.0f} + {row['pss_file_mib']:,.0f}) "
            f"| {row['times_one_process']:.2f}× | {supervisor} |"
        )
    for batch in args.batch:
        rows = {row["way"]: row for row in speed if row["batch"] == batch}
        print(
            f"\n{args.processes} serving processes, batch {batch}, one intra-op thread, "
            f"{2 * args.processes} connections: median predictions/s over {args.rounds} turns of {args.seconds:g} s: "
            + ", ".join(f"{way} {row['predictions_per_s']:.2f}" for way, row in rows.items())
            + f"; shared / prepacked {rows['shared']['shared_over_prepacked']:.2f}×"
        )


if __name__ == "__main__":
    main()
