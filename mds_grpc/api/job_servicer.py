"""mds.v1.JobService: converts and delegates to the job manager."""

from mds.v1 import job_service_pb2 as pb
from mds.v1 import job_service_pb2_grpc
from mds_grpc.api.auth import check_listing, check_model
from mds_grpc.api.call_record import annotate
from mds_grpc.api.jobs import batch_to_wire, column_from_wire, input_to_wire, job_to_wire, state_from_wire
from mds_grpc.api.tensors import to_arrays
from mds_grpc.core.errors import InvalidArgument
from mds_grpc.core.jobs import JobManager
from mds_grpc.core.limits import TensorLimits


class JobServicer(job_service_pb2_grpc.JobServiceServicer):
    def __init__(self, manager: JobManager, limits: TensorLimits):
        self.manager = manager
        self.limits = limits

    async def UploadJobInput(self, request_iterator, context):
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgument("the first UploadJobInputRequest must carry the header")
        specs = [column_from_wire(spec) for spec in first.header.inputs]

        async def chunks():
            async for request in request_iterator:
                if request.WhichOneof("payload") != "chunk":
                    raise InvalidArgument("only the first UploadJobInputRequest may carry a header")
                yield to_arrays(request.chunk.inputs, self.limits)

        return input_to_wire(await self.manager.upload_input(specs, chunks()))

    async def CreateJob(self, request, context):
        job = await self.manager.create(
            request.model,
            request.version,
            to_arrays(request.inputs, self.limits),
            request.input_id,
            list(request.output_names),
            request.batch_rows,
            request.alias,
        )
        annotate(job=job.id, version=job.version)
        return job_to_wire(job)

    async def _job(self, job_id: str):
        """The job, if the caller's key may use its model (job ids alone do not limit a key)."""
        job = await self.manager.get(job_id)
        check_model(job.model)
        return job

    async def GetJob(self, request, context):
        return job_to_wire(await self._job(request.id))

    async def ListJobs(self, request, context):
        check_listing(request.model, "model")
        jobs, token = await self.manager.list_page(
            state_from_wire(request.state), request.model, request.page_size, request.page_token
        )
        return pb.ListJobsResponse(jobs=[job_to_wire(j) for j in jobs], next_page_token=token)

    async def CancelJob(self, request, context):
        await self._job(request.id)
        return job_to_wire(await self.manager.cancel(request.id))

    async def WatchJob(self, request, context):
        await self._job(request.id)
        async for job in self.manager.watch(request.id):
            yield job_to_wire(job)

    async def GetJobResults(self, request, context):
        async for offset, rows, arrays in self.manager.results(await self._job(request.id)):
            yield batch_to_wire(offset, rows, arrays)
