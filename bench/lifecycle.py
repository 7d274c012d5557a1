"""Workloads on MDS with production storage (private MinIO + FerretDB): (d) a big upload, (e) a bulk job,
(f) cold start; jobs run in the server itself (no Redis). And (g) replicas: the big model in two serving
processes, on embedded storage (shared_memory.py)."""

import itertools
import json
import os
import statistics
import subprocess
import time
from functools import partial
from pathlib import Path

import numpy as np

import models
import shared_memory
from cold_start import first_prediction, floor_argv, from_bytecode
from harness import PREDICT, REPO, Target, check_outputs, peak_memory, session, upload
from local_machine import free_port
from mds.v1 import inference_service_pb2 as pb
from mds.v1 import job_service_pb2 as jobs
from mds.v1 import job_service_pb2_grpc, tensor_pb2
from mds_grpc.api.tensors import from_array, to_array

RAW_PUT = "minio client fput_object"
EXTERNAL_DATA = "external data"  # (d) models: the big one, weights in big.onnx.data
SINGLE_FILE = "single file"  # weights inline in the .onnx file
IN_PROCESS_JOB = "onnxruntime in-process"
ORT_LOAD = "onnxruntime read + load"
MDS_RESTART = "MDS restart → first prediction"
FLOOR_RESTART = "floor restart → first prediction"
RESTARTS = 3  # pairs of restarts (MDS, floor) per model; (f) reports the medians
JOB_BATCH_ROWS = 4096  # MDS_JOB_BATCH_ROWS's default
JOB_CHUNK_ROWS = 65536


def production(bench) -> Target:
    """MDS on MinIO + FerretDB started by scripts/services.sh in a private folder on free ports."""
    if ("MDS", "production") not in bench.servers:
        env = {
            **os.environ,
            "MDS_SERVICES_DIR": str(bench.work / "services"),
            "MDS_MINIO_PORT": str(free_port()),
            "MDS_FERRETDB_PORT": str(free_port()),
            "MDS_REDIS_PORT": str(free_port()),
        }

        def services(action: str) -> str:
            return subprocess.run(
                [str(REPO / "scripts" / "services.sh"), action], env=env, check=True, capture_output=True, text=True
            ).stdout

        bench.stack.callback(services, "stop")
        services("start")
        settings = dict(line.split("=", 1) for line in services("env").split())
        del settings["MDS_REDIS_URL"]
        bench.server(("MDS", "production"), lambda: bench.mds_server("mds-production", settings))
    return bench.servers[("MDS", "production")]


def big_shape(bench) -> tuple[int, int]:
    """The big model's weights: 1 GiB of fp32; 16 MiB in a smoke run."""
    return (1024, 4096) if bench.smoke else (8192, 32768)


def single_mib(bench) -> int:
    """The single-file model's size: 512 MiB; 32 MiB in a smoke run (still over the 16 MiB that MDS checks
    in the serving process, so a helper process checks it)."""
    return 32 if bench.smoke else 512


def upload_rate(bench) -> list[dict]:
    """(d) Each model's files into MinIO with the minio client, then through MDS's UploadModel: the big model
    (weights in an external-data file) and a single-file one (weights inline, checked in a helper process)."""
    from minio import Minio

    mds = production(bench)
    client = Minio(mds.env["MDS_S3_ENDPOINT"], mds.env["MDS_S3_ACCESS_KEY"], mds.env["MDS_S3_SECRET_KEY"], secure=False)
    client.make_bucket("bench-raw")
    big = models.big_model(*big_shape(bench))
    rows = []
    for model, path, side in (
        (EXTERNAL_DATA, big, (models.BIG_DATA,)),
        (SINGLE_FILE, models.single_file_model(single_mib(bench)), ()),
    ):
        files = [path, *(path.parent / s for s in side)]
        size = sum(f.stat().st_size for f in files)
        start = time.perf_counter()
        for file in files:
            client.fput_object("bench-raw", f"{path.stem}/{file.name}", str(file))
        raw = time.perf_counter() - start
        send = partial(upload, mds, f"upload-{path.stem}", path, side)
        figures = peak_memory({"server": mds.process.pid}, send, Path(mds.env["MDS_LOG_DIR"]) / "mds.log")
        rows += [
            {"target": RAW_PUT, "model": model, "mib": size / 2**20, "seconds": raw, "mb_per_s": size / 1e6 / raw},
            {
                "target": "MDS UploadModel",
                "model": model,
                "mib": size / 2**20,
                "seconds": figures["seconds"],
                "mb_per_s": size / 1e6 / figures["seconds"],
                "rss_growth_mib": figures["server"],
                "helper_peak_mib": figures["helper"],
                "helper_seconds": figures["helper_seconds"],
            },
        ]
    return rows


def bulk_job(bench) -> list[dict]:
    """(e) An MLP 64-256-10 over 1M rows (16,384 in a smoke) in batches of 4,096: in-process, then as an MDS job."""
    rows = 16384 if bench.smoke else 1_000_000
    path = bench.work / "mlp64.onnx"
    path.write_bytes(models.mlp(inputs=64))
    x = np.random.default_rng(0).standard_normal((rows, 64)).astype(np.float32)
    runner = session(path)
    start = time.perf_counter()
    want = np.concatenate(
        [runner.run(None, {"x": x[i : i + JOB_BATCH_ROWS]})[0] for i in range(0, rows, JOB_BATCH_ROWS)]
    )
    in_process = time.perf_counter() - start

    mds = production(bench)
    upload(mds, "mlp64", path)
    stub = job_service_pb2_grpc.JobServiceStub(mds.channel)
    header = jobs.JobInputHeader(
        inputs=[tensor_pb2.TensorSpec(name="x", dtype=tensor_pb2.DataType.DATA_TYPE_FP32, shape=x.shape)]
    )
    chunks = (
        jobs.UploadJobInputRequest(
            chunk=jobs.JobInputChunk(inputs=[from_array("x", x[i : i + JOB_CHUNK_ROWS], raw=True)])
        )
        for i in range(0, rows, JOB_CHUNK_ROWS)
    )
    start = time.perf_counter()
    job_input = stub.UploadJobInput(
        itertools.chain([jobs.UploadJobInputRequest(header=header)], chunks), metadata=mds.metadata
    )
    created = time.perf_counter()
    job = stub.CreateJob(
        jobs.CreateJobRequest(model="mlp64", input_id=job_input.id, batch_rows=JOB_BATCH_ROWS), metadata=mds.metadata
    )
    job = list(stub.WatchJob(jobs.WatchJobRequest(id=job.id), metadata=mds.metadata))[-1]  # as it ended
    done = time.perf_counter()
    if job.state != jobs.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"job {job.id} ended {jobs.JobState.Name(job.state)}: {job.error}")
    got = np.concatenate(
        [
            to_array(batch.outputs[0])
            for batch in stub.GetJobResults(jobs.GetJobResultsRequest(id=job.id), metadata=mds.metadata)
        ]
    )
    read = time.perf_counter()
    np.testing.assert_array_equal(got, want, err_msg="MDS job results")
    return [
        {"target": name, "rows": rows, "batch_rows": JOB_BATCH_ROWS, "seconds": s, "rows_per_s": rows / s}
        for name, s in (
            (IN_PROCESS_JOB, in_process),
            ("MDS job: CreateJob → SUCCEEDED", done - created),
            ("MDS job: input upload → results read", read - start),
        )
    ] + [  # where the time went: the client's calls, and the job's phases from the server's log
        {"target": f"  of which {part}", "seconds": s}
        for part, s in (
            ("UploadJobInput", created - start),
            ("GetJobResults", read - done),
            *((f"the job's {phase}", s) for phase, s in job_phases(mds, job.id).items()),
        )
    ]


def job_phases(server: Target, job_id: str) -> dict[str, float]:
    """Seconds per phase of a job that succeeded (load, fetch, run, store), from the server's log line."""
    log = Path(server.env["MDS_LOG_DIR"]) / "mds.log"
    for _ in range(100):  # the line comes just after the state changes
        lines = map(json.loads, log.read_text().splitlines())
        line = next((x for x in lines if x["message"] == "job succeeded" and x.get("job") == job_id), None)
        if line is not None:
            return line["seconds"]
        time.sleep(0.1)
    return {}


def cold_start(bench) -> list[dict]:
    """(f) Upload → first prediction on MinIO + FerretDB, against reading the files and loading them into an
    onnxruntime session (with its first run); restart → first prediction on the embedded default (what the
    floor needs: no store server), against the floor's (bench/floor_server.py on the same file), in RESTARTS
    alternating pairs (medians), each timed from starting its process to the answer of its first Predict by
    the same client retrying every 10 ms (cold_start.first_prediction), both from compiled bytecode; and one
    restart on MinIO + FerretDB. The real model, then the big one."""
    import serving

    rows = big_shape(bench)[0]
    cases: list[tuple[str, Path, tuple[str, ...], np.ndarray]] = [
        ("big", models.big_model(*big_shape(bench)), (models.BIG_DATA,), np.ones((1, rows), np.float32))
    ]
    if bench.smoke:
        cases.insert(0, ("mlp", bench.mlp_path, (), np.ones((1, 784), np.float32)))
    else:
        cases.insert(0, ("ocr-det", models.ocr_detector(), (), np.ones(serving.HEAVY_SHAPE, np.float32)))
    mds = production(bench)
    embedded = bench.server(("MDS", "cold"), lambda: bench.mds_server("mds-cold", {}))
    bytecode = from_bytecode(bench.work / "pycache")
    results = []
    for name, path, side, x in cases:
        start = time.perf_counter()
        for file in [path, *(path.parent / s for s in side)]:
            file.read_bytes()
        runner = session(path)
        feed = runner.get_inputs()[0].name
        want = runner.run(None, {feed: x})[0]
        loaded = time.perf_counter() - start
        del runner
        request = pb.PredictRequest(model=f"cold-{name}", inputs=[from_array(feed, x, raw=True)])
        start = time.perf_counter()
        upload(mds, request.model, path, side)
        check_outputs(mds, PREDICT, request, want)
        uploaded = time.perf_counter() - start
        upload(embedded, request.model, path, side)
        check_outputs(embedded, PREDICT, request, want)
        for server in (mds, embedded):  # restarts find what serves from then on (a big model's prepacked copy)
            settled(server)
            server.stop()  # each timed while no other server runs
        port = free_port()
        times: dict[str, list[float]] = {MDS_RESTART: [], FLOOR_RESTART: []}
        for turn in range(RESTARTS + (name == cases[0][0])):  # the first start of each writes its bytecode
            env = {**embedded.env, **bytecode}
            restarted = first_prediction(embedded.argv, env, embedded.port, request, embedded.metadata, want)
            floor = first_prediction(floor_argv(port, path), bytecode, port, request, want=want)
            if turn or name != cases[0][0]:
                times[MDS_RESTART].append(restarted)
                times[FLOOR_RESTART].append(floor)
        env = {**mds.env, **bytecode}
        on_stores = first_prediction(mds.argv, env, mds.port, request, mds.metadata, want)
        mds.start()  # again, for the workloads after this one
        embedded.start()
        results += [
            {"target": target, "model": name, "seconds": seconds}
            for target, seconds in (
                (ORT_LOAD, loaded),
                ("MDS upload → first prediction", uploaded),
                (MDS_RESTART, statistics.median(times[MDS_RESTART])),
                (FLOOR_RESTART, statistics.median(times[FLOOR_RESTART])),
                ("MDS on MinIO + FerretDB: restart → first prediction", on_stores),
            )
        ]
    return results


def settled(server: Target) -> None:
    """Wait until the server's big models run on their prepacked copies, made in a helper process after the
    first load (MDS_PREPACKED_COPIES): as a server restarted later finds them."""
    shared_memory.wait_for_copies([Path(server.env["MDS_LOG_DIR"]) / "mds.log"])


REPLICA_PROCESSES = 2
REPLICA_BATCHES = (1, 8)
MEMORY, THROUGHPUT = "MDS memory", "MDS throughput"


def replicas(bench) -> list[dict]:
    """(g) `mds serve --processes 2` with the big model, its weights prepacked into each process's session or
    shared (mapped from the stored file, the default): the serving processes' PSS with one and with two
    processes, then both ways' predictions/s in turns at batch 1 and 8 (shared_memory.measure). 3 turns of
    --duration each; a smoke run's 16 MiB model is shared from 1 MiB of external data, 1 turn."""
    memory, speed = shared_memory.measure(
        bench.work / "replicas",
        models.big_model(*big_shape(bench)),
        REPLICA_PROCESSES,
        REPLICA_BATCHES,
        bench.duration,
        rounds=1 if bench.smoke else 3,
        shared_min_bytes=1 << 20 if bench.smoke else None,
    )
    return [{"target": MEMORY, **row} for row in memory] + [{"target": THROUGHPUT, **row} for row in speed]
