"""Job store on SQLite (stdlib): the embedded default."""

import dataclasses
import json
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path

from mds_grpc.core.job_records import (
    JobInputRecord,
    JobRecord,
    JobResult,
    JobState,
    input_from_dict,
    input_to_dict,
    job_from_dict,
    job_to_dict,
)
from mds_grpc.storage.sqlite_db import SqliteDatabase

SCHEMA = """
CREATE TABLE IF NOT EXISTS job_inputs (id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_newest ON jobs (created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
"""
_DATES = ("created_at", "updated_at")


def _dumps(data: dict) -> str:
    return json.dumps(data, default=lambda value: value.isoformat())


def _dates(data: dict) -> dict:
    return {k: datetime.fromisoformat(v) if k in _DATES else v for k, v in data.items()}


def _job(text: str) -> JobRecord:
    data = _dates(json.loads(text))
    data["input"] = _dates(data["input"])
    return job_from_dict(data)


class SqliteJobStore:
    def __init__(self, path: Path):
        self.db = SqliteDatabase(path, SCHEMA)

    def create_input(self, record: JobInputRecord) -> None:
        with self.db.transaction() as db:
            db.execute("INSERT INTO job_inputs (id, record) VALUES (?, ?)", (record.id, _dumps(input_to_dict(record))))

    def get_input(self, input_id: str) -> JobInputRecord | None:
        rows = self.db.query("SELECT record FROM job_inputs WHERE id = ?", (input_id,))
        return input_from_dict(_dates(json.loads(rows[0][0]))) if rows else None

    def create(self, job: JobRecord) -> None:
        with self.db.transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, model, state, created_at, record) VALUES (?, ?, ?, ?, ?)",
                (job.id, job.model, job.state.value, job.created_at.isoformat(), _dumps(job_to_dict(job))),
            )

    def get(self, job_id: str) -> JobRecord | None:
        rows = self.db.query("SELECT record FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0][0]) if rows else None

    def list_page(
        self, state: JobState | None, model: str | None, after: tuple[datetime, str] | None, limit: int
    ) -> list[JobRecord]:
        where, params = [], []
        if state:
            where.append("state = ?")
            params.append(state.value)
        if model:
            where.append("model = ?")
            params.append(model)
        if after:
            where.append("(created_at, id) < (?, ?)")
            params.extend([after[0].isoformat(), after[1]])
        sql = "SELECT record FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        return [_job(text) for (text,) in self.db.query(sql, (*params, limit))]

    def count(self, state: JobState) -> int:
        return self.db.query("SELECT COUNT(*) FROM jobs WHERE state = ?", (state.value,))[0][0]

    def _update(self, job_id: str, change) -> JobRecord | None:
        """Apply `change(job) -> JobRecord | None` atomically; None leaves the job as it was."""
        with self.db.transaction() as db:
            rows = db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchall()
            changed = change(_job(rows[0][0])) if rows else None
            if changed is not None:
                changed = dataclasses.replace(changed, updated_at=datetime.now(UTC))
                db.execute(
                    "UPDATE jobs SET state = ?, record = ? WHERE id = ?",
                    (changed.state.value, _dumps(job_to_dict(changed)), job_id),
                )
            return changed

    def transition(
        self, job_id: str, sources: Collection[JobState], target: JobState, error: str = ""
    ) -> JobRecord | None:
        return self._update(
            job_id, lambda job: dataclasses.replace(job, state=target, error=error) if job.state in sources else None
        )

    def record_batch(self, job_id: str, result: JobResult) -> JobRecord | None:
        def append(job: JobRecord) -> JobRecord | None:
            if job.state != JobState.RUNNING or job.rows_done != result.offset:
                return None
            return dataclasses.replace(job, rows_done=job.rows_done + result.rows, results=(*job.results, result))

        return self._update(job_id, append)

    def referenced_blobs(self) -> set[str]:
        inputs = [input_from_dict(_dates(json.loads(t))) for (t,) in self.db.query("SELECT record FROM job_inputs")]
        jobs = [_job(text) for (text,) in self.db.query("SELECT record FROM jobs")]
        return (
            {t.sha256 for i in inputs for t in i.tensors}
            | {r.sha256 for j in jobs for r in j.results}
            | {t.sha256 for j in jobs for t in j.input.tensors}
        )

    def blob_in_use(self, sha256: str) -> bool:
        pattern = f'%"{sha256}"%'  # records are JSON: a blob appears as a quoted hex string
        return bool(
            self.db.query(
                "SELECT 1 FROM job_inputs WHERE record LIKE ? UNION ALL SELECT 1 FROM jobs WHERE record LIKE ? LIMIT 1",
                (pattern, pattern),
            )
        )

    def ping(self) -> None:
        self.db.query("SELECT 1")
