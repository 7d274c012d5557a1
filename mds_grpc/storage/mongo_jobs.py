"""Job store on MongoDB: state changes are single conditional find_one_and_update calls."""

from collections.abc import Collection
from datetime import UTC, datetime

from pymongo import ReturnDocument

from mds_grpc.core.job_records import (
    JobInputRecord,
    JobRecord,
    JobResult,
    JobState,
    input_from_dict,
    input_to_dict,
    job_from_dict,
    job_to_dict,
    result_to_dict,
)
from mds_grpc.storage.mongo_metadata import MongoConnection

NO_ID = {"_id": 0}


def _job(doc: dict) -> JobRecord:
    return job_from_dict({k: v for k, v in doc.items() if k != "_id"})


class MongoJobStore:
    def __init__(self, connection: MongoConnection):
        self.connection = connection
        self.inputs = connection.db["job_inputs"]
        self.jobs = connection.db["jobs"]
        connection.index(self.jobs, [("created_at", -1), ("id", -1)], name="jobs_newest")
        connection.index(self.jobs, [("id", 1)], name="jobs_id", unique=True)
        connection.index(self.jobs, [("state", 1)], name="jobs_state")
        connection.index(self.inputs, [("id", 1)], name="job_inputs_id", unique=True)

    def create_input(self, record: JobInputRecord) -> None:
        with self.connection.reachable():
            self.inputs.insert_one(input_to_dict(record))

    def get_input(self, input_id: str) -> JobInputRecord | None:
        with self.connection.reachable():
            doc = self.inputs.find_one({"id": input_id}, NO_ID)
        return input_from_dict(doc) if doc else None

    def create(self, job: JobRecord) -> None:
        with self.connection.reachable():
            self.jobs.insert_one(job_to_dict(job))

    def get(self, job_id: str) -> JobRecord | None:
        with self.connection.reachable():
            doc = self.jobs.find_one({"id": job_id}, NO_ID)
        return _job(doc) if doc else None

    def list_page(
        self, state: JobState | None, model: str | None, after: tuple[datetime, str] | None, limit: int
    ) -> list[JobRecord]:
        query: dict = {}
        if state:
            query["state"] = state.value
        if model:
            query["model"] = model
        if after:
            query = {
                "$and": [
                    query,
                    {"$or": [{"created_at": {"$lt": after[0]}}, {"created_at": after[0], "id": {"$lt": after[1]}}]},
                ]
            }
        with self.connection.reachable():
            cursor = self.jobs.find(query, NO_ID).sort([("created_at", -1), ("id", -1)]).limit(limit)
            return [_job(doc) for doc in cursor]

    def count(self, state: JobState) -> int:
        with self.connection.reachable():
            return self.jobs.count_documents({"state": state.value})

    def _update(self, query: dict, update: dict) -> JobRecord | None:
        update.setdefault("$set", {})["updated_at"] = datetime.now(UTC)
        with self.connection.reachable():
            # No projection: FerretDB does not implement one for findAndModify.
            doc = self.jobs.find_one_and_update(query, update, return_document=ReturnDocument.AFTER)
        return _job(doc) if doc else None

    def transition(
        self, job_id: str, sources: Collection[JobState], target: JobState, error: str = ""
    ) -> JobRecord | None:
        return self._update(
            {"id": job_id, "state": {"$in": [s.value for s in sources]}},
            {"$set": {"state": target.value, "error": error}},
        )

    def record_batch(self, job_id: str, result: JobResult) -> JobRecord | None:
        query = {"id": job_id, "state": JobState.RUNNING.value, "rows_done": result.offset}
        update = {"$inc": {"rows_done": result.rows}, "$push": {"results": result_to_dict(result)}}
        return self._update(query, update)

    def referenced_blobs(self) -> set[str]:
        with self.connection.reachable():
            return (
                set(self.inputs.distinct("tensors.sha256"))
                | set(self.jobs.distinct("input.tensors.sha256"))
                | set(self.jobs.distinct("results.sha256"))
            )

    def blob_in_use(self, sha256: str) -> bool:
        with self.connection.reachable():
            return (
                self.inputs.find_one({"tensors.sha256": sha256}, {"_id": 1}) is not None
                or self.jobs.find_one(
                    {"$or": [{"input.tensors.sha256": sha256}, {"results.sha256": sha256}]}, {"_id": 1}
                )
                is not None
            )

    def ping(self) -> None:
        self.connection.ping()
