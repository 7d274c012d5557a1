"""Workloads on MDS with production storage (private MinIO + FerretDB): (d) a big upload, (e) a bulk job,
(f) cold start. Jobs run in the server itself (no Redis)."""

import itertools
import os
import subprocess
import time
from pathlib import Path

import numpy as np

import models
from harness import PREDICT, REPO, Target, check_outputs, memory_kib, session, upload
from local_machine import free_port
from mds.v1 import inference_service_pb2 as pb
from mds.v1 import job_service_pb2 as jobs
from mds.v1 import job_service_pb2_grpc, tensor_pb2
from mds_grpc.api.tensors import from_array, to_array

RAW_PUT = "minio client fput_object"
IN_PROCESS_JOB = "onnxruntime in-process"
ORT_LOAD = "onnxruntime read + load"
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


def upload_rate(bench) -> list[dict]:
    """(d) The big model's files into MinIO with the minio client, then through MDS's UploadModel."""
    from minio import Minio

    mds = production(bench)
    path = models.big_model(*big_shape(bench))
    files = [path, path.parent / models.BIG_DATA]
    size = sum(f.stat().st_size for f in files)
    client = Minio(mds.env["MDS_S3_ENDPOINT"], mds.env["MDS_S3_ACCESS_KEY"], mds.env["MDS_S3_SECRET_KEY"], secure=False)
    client.make_bucket("bench-raw")
    start = time.perf_counter()
    for file in files:
        client.fput_object("bench-raw", f"big/{file.name}", str(file))
    raw = time.perf_counter() - start
    rss = memory_kib(mds.process.pid, "VmRSS")
    Path(f"/proc/{mds.process.pid}/clear_refs").write_text("5")  # resets VmHWM, the peak RSS
    start = time.perf_counter()
    upload(mds, "big", path, (models.BIG_DATA,))
    seconds = time.perf_counter() - start
    growth = (memory_kib(mds.process.pid, "VmHWM") - rss) / 1024
    return [
        {"target": name, "mib": size / 2**20, "seconds": s, "mb_per_s": size / 1e6 / s, "rss_growth_mib": g}
        for name, s, g in ((RAW_PUT, raw, None), ("MDS UploadModel", seconds, growth))
    ]


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
    ]


def cold_start(bench) -> list[dict]:
    """(f) Upload → first prediction and restart → first prediction, against reading the files and loading
    them into an onnxruntime session (with its first run). The real model, then the big one."""
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
        mds.stop()
        start = time.perf_counter()
        mds.start()
        check_outputs(mds, PREDICT, request, want)
        restarted = time.perf_counter() - start
        results += [
            {"target": target, "model": name, "seconds": seconds}
            for target, seconds in (
                (ORT_LOAD, loaded),
                ("MDS upload → first prediction", uploaded),
                ("MDS restart → first prediction", restarted),
            )
        ]
    return results
