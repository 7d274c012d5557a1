"""Jobs survive a killed worker (Redis) or a killed server (embedded): every row exactly once."""

import signal
import uuid

import numpy as np

from harness import (
    DENSE,
    ServerProcess,
    WorkerProcess,
    backend_env,
    chunked_input,
    in_process,
    results,
    upload_requests,
    watch,
)
from mds.v1 import job_service_pb2 as pb

ROWS, BATCH = 20_000, 100
SLOW = {"MDS_JOB_COMMIT_MS": "0"}  # every batch recorded on its own: a job long enough to interrupt


def start_long_job(server: ServerProcess) -> tuple[str, np.ndarray]:
    server.models.UploadModel(upload_requests("dense", DENSE))
    x = np.random.default_rng(5).standard_normal((ROWS, 8)).astype(np.float32)
    job_input = server.jobs.UploadJobInput(chunked_input(x, chunk_rows=10_000))
    return server.jobs.CreateJob(pb.CreateJobRequest(model="dense", input_id=job_input.id, batch_rows=BATCH)).id, x


def wait_until_running(server: ServerProcess, job_id: str) -> pb.Job:
    for job in server.jobs.WatchJob(pb.WatchJobRequest(id=job_id), timeout=120):
        if job.rows_done >= 5 * BATCH:
            return job
    raise AssertionError("the job ended before it could be interrupted")


def assert_exactly_once(server: ServerProcess, job_id: str, x: np.ndarray) -> None:
    final = watch(server, job_id)[-1]
    assert (final.state, final.rows_done) == (pb.JOB_STATE_SUCCEEDED, ROWS), final.error
    batches, got = results(server, job_id)
    assert [(b.row_offset, b.rows) for b in batches] == [(o, BATCH) for o in range(0, ROWS, BATCH)]
    np.testing.assert_array_equal(got["scores"], in_process(DENSE, x, BATCH)["scores"])


def test_sigkilled_worker_loses_and_repeats_no_rows(services, tmp_path):
    env = {**backend_env(services, f"kill-worker-{uuid.uuid4().hex[:8]}"), "MDS_JOB_HEARTBEAT_MS": "1500", **SLOW}
    server = ServerProcess(tmp_path, **env).start()
    try:
        job_id, x = start_long_job(server)
        interrupted = wait_until_running(server, job_id)
        victim = server.workers.pop()
        victim.process.send_signal(signal.SIGKILL)
        assert victim.process.wait(30) == -signal.SIGKILL
        assert interrupted.rows_done < ROWS
        server.workers.append(WorkerProcess(server, "second-worker"))  # takes the job over
        assert_exactly_once(server, job_id, x)
    finally:
        assert server.stop() == 0


def test_sigkilled_embedded_server_resumes_jobs_on_restart(tmp_path):
    server = ServerProcess(tmp_path, **SLOW).start()
    job_id, x = start_long_job(server)
    interrupted = wait_until_running(server, job_id)
    server.stop(signal.SIGKILL)
    assert interrupted.rows_done < ROWS
    restarted = ServerProcess(tmp_path, **SLOW).start()
    try:
        assert_exactly_once(restarted, job_id, x)
    finally:
        assert restarted.stop() == 0
