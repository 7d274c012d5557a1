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
    row_shapes: tuple[tuple[int, ...], ...] = ()  # per output, in the job's order; () in results stored before


@dataclass(frozen=True)
class JobOutput:
    """An output a job computes, as its model version declares it: -1 for a symbolic dimension."""

    name: str
    dtype: str
    row_shape: tuple[int, ...]


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
    outputs: tuple[JobOutput, ...] = ()  # () in jobs stored before outputs were recorded

    @property
    def rows_total(self) -> int:
        return self.input.rows


def input_to_dict(record: JobInputRecord) -> dict:
    return dataclasses.asdict(record)


def input_from_dict(data: dict) -> JobInputRecord:
    tensors = tuple(JobTensor(t["name"], t["dtype"], tuple(t["row_shape"]), t["sha256"]) for t in data["tensors"])
    return JobInputRecord(data["id"], data["rows"], tensors, data["created_at"])


def result_to_dict(result: JobResult) -> dict:
    """Row shapes as {"dims": [...]} objects: some MongoDB-compatible stores (FerretDB) refuse nested arrays."""
    return {**dataclasses.asdict(result), "row_shapes": [{"dims": list(shape)} for shape in result.row_shapes]}


def job_to_dict(record: JobRecord) -> dict:
    data = dataclasses.asdict(record)
    data["state"] = record.state.value
    data["input"] = input_to_dict(record.input)
    data["results"] = [result_to_dict(result) for result in record.results]
    return data


def job_from_dict(data: dict) -> JobRecord:
    return JobRecord(
        **{
            **data,
            "state": JobState(data["state"]),
            "input": input_from_dict(data["input"]),
            "output_names": tuple(data["output_names"]),
            "results": tuple(_result(r) for r in data["results"]),
            "outputs": tuple(JobOutput(o["name"], o["dtype"], tuple(o["row_shape"])) for o in data.get("outputs", ())),
        }
    )


def _result(data: dict) -> JobResult:
    shapes = tuple(tuple(shape["dims"]) for shape in data.get("row_shapes", ()))
    return JobResult(data["offset"], data["rows"], data["sha256"], shapes)
