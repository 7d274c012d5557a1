"""What MDS knows about a bulk job and its input, and their plain-dict form for stores."""

import dataclasses
import enum
from dataclasses import dataclass
from datetime import datetime


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobTensor:
    """One input column: `rows` x `row_shape` elements, raw little-endian, in a blob."""

    name: str
    dtype: str
    row_shape: tuple[int, ...]
    sha256: str


@dataclass(frozen=True)
class JobInputRecord:
    id: str
    rows: int
    tensors: tuple[JobTensor, ...]
    created_at: datetime


@dataclass(frozen=True)
class JobResult:
    """The outputs of rows [offset, offset + rows), an .npz blob."""

    offset: int
    rows: int
    sha256: str


@dataclass(frozen=True)
class JobRecord:
    id: str
    model: str
    version: int
    state: JobState
    input: JobInputRecord
    output_names: tuple[str, ...]
    batch_rows: int
    created_at: datetime
    updated_at: datetime
    rows_done: int = 0
    error: str = ""
    results: tuple[JobResult, ...] = ()

    @property
    def rows_total(self) -> int:
        return self.input.rows


def input_to_dict(record: JobInputRecord) -> dict:
    return dataclasses.asdict(record)


def input_from_dict(data: dict) -> JobInputRecord:
    tensors = tuple(JobTensor(t["name"], t["dtype"], tuple(t["row_shape"]), t["sha256"]) for t in data["tensors"])
    return JobInputRecord(data["id"], data["rows"], tensors, data["created_at"])


def job_to_dict(record: JobRecord) -> dict:
    data = dataclasses.asdict(record)
    data["state"] = record.state.value
    data["input"] = input_to_dict(record.input)
    return data


def job_from_dict(data: dict) -> JobRecord:
    return JobRecord(
        **{
            **data,
            "state": JobState(data["state"]),
            "input": input_from_dict(data["input"]),
            "output_names": tuple(data["output_names"]),
            "results": tuple(JobResult(**r) for r in data["results"]),
        }
    )
