"""mds.v1 job messages <-> core job records."""

from mds.v1 import job_service_pb2 as pb
from mds.v1 import tensor_pb2
from mds_grpc.api.tensors import from_array, from_wire_dtype, to_wire_dtype
from mds_grpc.core.errors import InvalidArgument
from mds_grpc.core.job_records import JobInputRecord, JobRecord, JobState
from mds_grpc.core.jobs import ColumnSpec


def job_to_wire(job: JobRecord) -> pb.Job:
    message = pb.Job(
        id=job.id,
        model=job.model,
        version=job.version,
        state="JOB_STATE_" + job.state.value,
        rows_total=job.rows_total,
        rows_done=job.rows_done,
        error=job.error,
        batch_rows=job.batch_rows,
        output_names=job.output_names,
    )
    message.created_at.FromDatetime(job.created_at)
    message.updated_at.FromDatetime(job.updated_at)
    return message


def state_from_wire(value: int) -> JobState | None:
    if value == pb.JOB_STATE_UNSPECIFIED:
        return None
    if value not in pb.JobState.values():
        raise InvalidArgument(f"unknown job state {value}")
    return JobState(pb.JobState.Name(value).removeprefix("JOB_STATE_"))


def input_to_wire(record: JobInputRecord) -> pb.JobInput:
    return pb.JobInput(
        id=record.id,
        rows=record.rows,
        inputs=[
            tensor_pb2.TensorSpec(name=t.name, dtype=to_wire_dtype(t.dtype), shape=(record.rows, *t.row_shape))
            for t in record.tensors
        ],
    )


def column_from_wire(spec: tensor_pb2.TensorSpec) -> ColumnSpec:
    return ColumnSpec(spec.name, from_wire_dtype(spec.dtype, spec.name).name, tuple(spec.shape))


def batch_to_wire(offset: int, rows: int, arrays: dict) -> pb.JobResultBatch:
    return pb.JobResultBatch(
        row_offset=offset, rows=rows, outputs=[from_array(name, array, raw=True) for name, array in arrays.items()]
    )
