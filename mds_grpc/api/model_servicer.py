"""mds.v1.ModelService: converts and delegates to the model registry."""

from mds.v1 import model_service_pb2 as pb
from mds.v1 import model_service_pb2_grpc
from mds_grpc.api.auth import check_listing, check_model
from mds_grpc.api.call_record import annotate
from mds_grpc.api.models import model_to_wire, split_upload
from mds_grpc.core.auth import ADMIN
from mds_grpc.core.registry import ModelRegistry


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, registry: ModelRegistry):
        self.registry = registry

    async def UploadModel(self, request_iterator, context):
        header, parts = await split_upload(request_iterator)
        annotate(model=header.name)
        check_model(header.name, ADMIN)
        record = await self.registry.upload(header, parts)
        annotate(version=record.version)
        return model_to_wire(record)

    async def GetModel(self, request, context):
        return model_to_wire(await self.registry.get(request.name, request.version))

    async def ListModels(self, request, context):
        check_listing(request.name, "name")
        records, token = await self.registry.list_page(request.name, request.page_size, request.page_token)
        return pb.ListModelsResponse(models=[model_to_wire(r) for r in records], next_page_token=token)

    async def DeleteModel(self, request, context):
        versions = await self.registry.delete(request.name, request.version)
        return pb.DeleteModelResponse(name=request.name, deleted_versions=versions)
