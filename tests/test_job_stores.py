"""Every job store passes the same tests: SQLite (embedded default) and MongoDB (FerretDB here)."""

import uuid
from datetime import UTC, datetime

import pytest

from mds_grpc.core.job_records import JobInputRecord, JobOutput, JobRecord, JobResult, JobState, JobTensor
from mds_grpc.storage.mongo_jobs import MongoJobStore
from mds_grpc.storage.mongo_metadata import MongoConnection
from mds_grpc.storage.sqlite_jobs import SqliteJobStore

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "mongo"])
def jobs(request, tmp_path):
    if request.param == "sqlite":
        return SqliteJobStore(tmp_path / "jobs.sqlite3")
    uri = request.getfixturevalue("services")["MDS_MONGO_URI"]
    return MongoJobStore(MongoConnection(uri, "test-" + uuid.uuid4().hex[:12]))


def new_job(model: str = "m") -> JobRecord:
    rows = JobInputRecord(uuid.uuid4().hex, 10, (JobTensor("x", "FP32", (3,), "c" * 64),), NOW)
    outputs = (JobOutput("y", "FP32", (-1, 2)),)
    return JobRecord(uuid.uuid4().hex, model, 1, JobState.QUEUED, rows, ("y",), 4, NOW, NOW, outputs=outputs)


def test_a_job_round_trips_and_records_each_batch_once(jobs):
    job = new_job()
    jobs.create(job)
    assert jobs.get(job.id) == job
    assert jobs.transition(job.id, {JobState.QUEUED}, JobState.RUNNING).state == JobState.RUNNING
    first = JobResult(0, 4, "d" * 64, ((5, 2),))
    assert jobs.record_batch(job.id, first).rows_done == 4
    assert jobs.record_batch(job.id, first) is None  # offset 0 again: already recorded
    assert jobs.get(job.id).results == (first,)
    assert "d" * 64 in jobs.referenced_blobs()
    assert jobs.blob_in_use("d" * 64) and jobs.blob_in_use("c" * 64) and not jobs.blob_in_use("e" * 64)


def test_counts_by_state_follow_transitions(jobs):
    queued = [new_job() for _ in range(3)]
    for job in queued:
        jobs.create(job)
    jobs.transition(queued[0].id, {JobState.QUEUED}, JobState.RUNNING)
    assert (jobs.count(JobState.QUEUED), jobs.count(JobState.RUNNING)) == (2, 1)
    jobs.transition(queued[0].id, {JobState.RUNNING}, JobState.SUCCEEDED)
    jobs.transition(queued[1].id, {JobState.QUEUED}, JobState.CANCELLED)
    assert [jobs.count(s) for s in JobState] == [1, 0, 1, 0, 1]
