"""Bulk jobs against a real server: embedded (in-process worker) and MongoDB + S3 + Redis (mds worker)."""

import json
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import pytest

import onnx_models
from harness import (
    DENSE,
    ServerProcess,
    assert_status,
    chunked_input,
    in_process,
    results,
    upload_requests,
    wait_until,
    watch,
)
from mds.v1 import job_service_pb2 as pb
from mds.v1 import tensor_pb2
from mds_grpc.api.tensors import from_array

RNG = np.random.default_rng(3)


@pytest.fixture(scope="module")
def dense(server):
    server.models.UploadModel(upload_requests("dense-for-jobs", DENSE))
    return "dense-for-jobs"


def test_inline_job_is_queued_then_succeeds_with_onnxruntime_outputs(server, dense):
    x = RNG.standard_normal((1000, 8)).astype(np.float32)
    job = server.jobs.CreateJob(pb.CreateJobRequest(model=dense, inputs=[from_array("x", x, raw=True)], batch_rows=128))
    assert (job.state, job.rows_total, job.rows_done, job.batch_rows) == (pb.JOB_STATE_QUEUED, 1000, 0, 128)
    assert list(job.output_names) == ["scores", "label"] and job.version == 1
    updates = watch(server, job.id)
    assert updates[-1].state == pb.JOB_STATE_SUCCEEDED and updates[-1].rows_done == 1000
    done = [u.rows_done for u in updates]
    assert done == sorted(done) and all(d % 128 == 0 or d == 1000 for d in done)
    batches, got = results(server, job.id)
    # Results come in whole batches (several per message when they are recorded together), in row order.
    assert [b.row_offset for b in batches] == list(np.cumsum([0] + [b.rows for b in batches[:-1]]))
    assert sum(b.rows for b in batches) == 1000 and all(b.rows % 128 == 0 for b in batches[:-1])
    want = in_process(DENSE, x, 128)
    np.testing.assert_array_equal(got["scores"], want["scores"])
    np.testing.assert_array_equal(got["label"], want["label"])
    fetched = server.jobs.GetJob(pb.GetJobRequest(id=job.id))
    assert (
        fetched.state == pb.JOB_STATE_SUCCEEDED and fetched.updated_at.ToDatetime() >= fetched.created_at.ToDatetime()
    )
    logs = [server.log_dir, *(worker.root / "logs" for worker in server.workers)]

    def succeeded() -> list[dict]:  # the line comes just after the state changes
        lines = [json.loads(line) for log in logs for line in (log / "mds.log").read_text().splitlines()]
        return [line for line in lines if line["message"] == "job succeeded" and line["job"] == job.id]

    wait_until(succeeded, what="the job's last log line")
    assert set(succeeded()[0]["seconds"]) == {"load", "fetch", "run", "store"}  # where its time went


def test_uploaded_input_in_chunks(server, dense):
    x = RNG.standard_normal((5000, 8)).astype(np.float32)
    job_input = server.jobs.UploadJobInput(chunked_input(x, chunk_rows=700))
    assert job_input.rows == 5000 and list(job_input.inputs[0].shape) == [5000, 8]
    job = server.jobs.CreateJob(
        pb.CreateJobRequest(model=dense, input_id=job_input.id, output_names=["label"], batch_rows=1024)
    )
    assert watch(server, job.id)[-1].state == pb.JOB_STATE_SUCCEEDED
    _, got = results(server, job.id)
    assert list(got) == ["label"]
    np.testing.assert_array_equal(got["label"], in_process(DENSE, x, 1024)["label"])


def test_a_job_failing_at_run_time_says_why(server):
    server.models.UploadModel(upload_requests("reshape-by-four", onnx_models.fails_unless_rows_divide_by_four()))
    x = np.ones((7, 2), np.float32)
    job = server.jobs.CreateJob(
        pb.CreateJobRequest(model="reshape-by-four", inputs=[from_array("x", x, raw=True)], batch_rows=4)
    )
    final = watch(server, job.id)[-1]
    assert final.state == pb.JOB_STATE_FAILED and final.rows_done == 4
    assert "onnxruntime failed on rows 4-6" in final.error
    assert_status(
        lambda: list(server.jobs.GetJobResults(pb.GetJobResultsRequest(id=job.id))),
        grpc.StatusCode.FAILED_PRECONDITION,
        "is FAILED",
    )


def test_cancel_stops_a_job(server, dense):
    x = RNG.standard_normal((200_000, 8)).astype(np.float32)
    job_input = server.jobs.UploadJobInput(chunked_input(x, chunk_rows=50_000))
    job = server.jobs.CreateJob(pb.CreateJobRequest(model=dense, input_id=job_input.id, batch_rows=10))
    # Cancelled once running: FerretDB's SQLite handler applies findAndModify outside a transaction
    # (FerretDB issue 3040), so a cancel racing the worker's own QUEUED -> RUNNING update can be lost
    # there, which MongoDB's atomic conditional updates rule out.
    updates = server.jobs.WatchJob(pb.WatchJobRequest(id=job.id), timeout=120)
    assert next(u for u in updates if u.state != pb.JOB_STATE_QUEUED).state == pb.JOB_STATE_RUNNING
    updates.cancel()
    cancelled = server.jobs.CancelJob(pb.CancelJobRequest(id=job.id))
    assert cancelled.state == pb.JOB_STATE_CANCELLED
    final = watch(server, job.id)[-1]
    assert final.state == pb.JOB_STATE_CANCELLED and final.rows_done < 200_000
    assert_status(
        lambda: server.jobs.CancelJob(pb.CancelJobRequest(id=job.id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "is CANCELLED; only queued or running jobs can be cancelled",
    )


def test_list_jobs_by_state_and_model(server, dense):
    x = np.ones((3, 8), np.float32)
    ids = [
        server.jobs.CreateJob(pb.CreateJobRequest(model=dense, inputs=[from_array("x", x, raw=True)])).id
        for _ in range(3)
    ]
    for job_id in ids:
        watch(server, job_id)
    pages, token = [], ""
    while True:
        page = server.jobs.ListJobs(
            pb.ListJobsRequest(model=dense, state=pb.JOB_STATE_SUCCEEDED, page_size=2, page_token=token)
        )
        pages.extend(job.id for job in page.jobs)
        if not (token := page.next_page_token):
            break
    assert pages[:3] == ids[::-1]  # newest first
    assert not server.jobs.ListJobs(pb.ListJobsRequest(model="no-such-model")).jobs


ONES = np.ones((2, 8), np.float32)


@pytest.mark.parametrize(
    "request_fields, code, fragment",
    [
        (
            {"model": "no-such-model", "inputs": [from_array("x", ONES, True)]},
            grpc.StatusCode.NOT_FOUND,
            "does not exist",
        ),
        (
            {"inputs": [from_array("x", ONES.astype(np.float64), True)]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "input 'x' must have dtype FP32, got FP64",
        ),
        (
            {"inputs": [from_array("x", np.ones((2, 5), np.float32), True)]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "input 'x' must have shape [?, 8]",
        ),
        ({"inputs": [from_array("y", ONES, True)]}, grpc.StatusCode.INVALID_ARGUMENT, "has no input 'y'"),
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "either inline in `inputs` or as `input_id`"),
        ({"inputs": [from_array("x", ONES, True)], "input_id": "abc"}, grpc.StatusCode.INVALID_ARGUMENT, "not both"),
        ({"input_id": "no-such-input"}, grpc.StatusCode.NOT_FOUND, "job input 'no-such-input' does not exist"),
        (
            {"inputs": [from_array("x", ONES, True)], "output_names": ["nope"]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "no output 'nope'",
        ),
        ({"inputs": [from_array("x", ONES, True)], "batch_rows": -1}, grpc.StatusCode.INVALID_ARGUMENT, "batch_rows"),
        (
            {"inputs": [from_array("x", ONES, True)], "batch_rows": 2**21},
            grpc.StatusCode.INVALID_ARGUMENT,
            "MDS_MAX_JOB_BATCH_ROWS",
        ),
    ],
)
def test_create_job_errors(server, dense, request_fields, code, fragment):
    request = pb.CreateJobRequest(
        model=request_fields.get("model", dense), **{k: v for k, v in request_fields.items() if k != "model"}
    )
    assert_status(lambda: server.jobs.CreateJob(request), code, fragment)


@pytest.mark.usefixtures("nothing_left")  # the columns streamed to S3 are abandoned too
def test_upload_input_errors(server):
    x = np.ones((10, 8), np.float32)
    requests = list(chunked_input(x, chunk_rows=4))
    assert_status(
        lambda: server.jobs.UploadJobInput(iter(requests[1:])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "first UploadJobInputRequest must carry the header",
    )
    assert_status(
        lambda: server.jobs.UploadJobInput(iter(requests[:-1])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "received 8 rows, the header declared 10",
    )
    assert_status(
        lambda: server.jobs.UploadJobInput(iter(requests + requests[-1:])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "more rows than the 10 the header declared",
    )
    wrong = list(chunked_input(np.ones((10, 3), np.float32), chunk_rows=10))[1]
    assert_status(
        lambda: server.jobs.UploadJobInput(iter([requests[0], wrong])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "chunk tensor 'x' must be FP32 with rows of shape [8]",
    )
    strings = pb.JobInputHeader(inputs=[tensor_pb2.TensorSpec(name="s", dtype=tensor_pb2.DATA_TYPE_STRING, shape=[2])])
    assert_status(
        lambda: server.jobs.UploadJobInput(iter([pb.UploadJobInputRequest(header=strings)])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "jobs take numeric and boolean tensors only",
    )


def test_unknown_job(server):
    for call, request in (
        (server.jobs.GetJob, pb.GetJobRequest(id="nope")),
        (server.jobs.CancelJob, pb.CancelJobRequest(id="nope")),
    ):
        assert_status(partial(call, request), grpc.StatusCode.NOT_FOUND, "job 'nope' does not exist")
    assert_status(lambda: watch(server, "nope"), grpc.StatusCode.NOT_FOUND)


def test_unknown_state_filter(server):
    assert_status(
        lambda: server.jobs.ListJobs(pb.ListJobsRequest(state=42)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown job state 42",
    )


def test_input_names_never_become_paths(server, tmp_path):
    """An input named like a path must not steer where a worker writes the job's columns."""
    escape = "../../../../../../../tmp/mds-escape-" + tmp_path.name
    model = onnx_models.dense(input_name=escape)
    server.models.UploadModel(upload_requests("path-named-input", model))
    x = np.ones((5, 8), np.float32)
    job = server.jobs.CreateJob(pb.CreateJobRequest(model="path-named-input", inputs=[from_array(escape, x, True)]))
    assert watch(server, job.id)[-1].state == pb.JOB_STATE_SUCCEEDED
    assert not Path("/tmp/mds-escape-" + tmp_path.name).exists()


def test_batches_recorded_together_come_back_in_slices_that_fit_a_message(tmp_path):
    """20 batches of 1,000 rows recorded as one result (400 KB of outputs); 256 KiB messages need several."""
    server = ServerProcess(tmp_path, mds_max_message_bytes=256 * 1024, mds_job_commit_ms=600_000).start()
    try:
        server.models.UploadModel(upload_requests("dense", onnx_models.dense()), timeout=120)
        x = np.random.default_rng(3).standard_normal((20_000, 8)).astype(np.float32)
        job_input = server.jobs.UploadJobInput(chunked_input(x, 2_000), timeout=120)
        job = server.jobs.CreateJob(pb.CreateJobRequest(model="dense", input_id=job_input.id, batch_rows=1_000))
        assert {u.rows_done for u in watch(server, job.id)} == {0, 20_000}  # one record for all 20 batches
        batches, outputs = results(server, job.id)
        assert len(batches) >= 3 and all(b.ByteSize() <= 256 * 1024 for b in batches)
        assert [b.row_offset for b in batches] == list(np.cumsum([0] + [b.rows for b in batches[:-1]]))
        want = in_process(onnx_models.dense(), x, 1_000)
        np.testing.assert_allclose(outputs["scores"], want["scores"], rtol=1e-6)
        np.testing.assert_array_equal(outputs["label"], want["label"])
    finally:
        server.stop()
