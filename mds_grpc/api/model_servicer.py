"""mds.v1.ModelService: converts and delegates to the model registry and the aliases."""

from mds.v1 import model_service_pb2 as pb
from mds.v1 import model_service_pb2_grpc
from mds_grpc.api.auth import caller, check_listing, check_model
from mds_grpc.api.call_record import annotate
from mds_grpc.api.models import alias_change_to_wire, alias_to_wire, model_to_wire, split_upload
from mds_grpc.core.aliases import Aliases
from mds_grpc.core.auth import ADMIN
from mds_grpc.core.records import ModelRecord
from mds_grpc.core.registry import ModelRegistry


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, registry: ModelRegistry, aliases: Aliases):
        self.registry = registry
        self.aliases = aliases

    async def _models(self, records: list[ModelRecord]) -> list[pb.Model]:
        pointing = await self.aliases.pointing_at(records)
        return [model_to_wire(r, pointing.get((r.name, r.version), ()), self.registry.runs_on(r)) for r in records]

    async def UploadModel(self, request_iterator, context):
        header, parts = await split_upload(request_iterator)
        annotate(model=header.name)
        check_model(header.name, ADMIN)
        record = await self.registry.upload(header, parts)
        annotate(version=record.version)
        return model_to_wire(record, runs_on=self.registry.runs_on(record))

    async def GetModel(self, request, context):
        version = await self.aliases.version_for(request.name, request.version, request.alias, canary=False)
        (model,) = await self._models([await self.registry.get(request.name, version)])
        return model

    async def ListModels(self, request, context):
        check_listing(request.name, "name")
        records, token = await self.registry.list_page(request.name, request.page_size, request.page_token)
        return pb.ListModelsResponse(models=await self._models(records), next_page_token=token)

    async def DeleteModel(self, request, context):
        versions = await self.aliases.delete_model(request.name, request.version, request.remove_aliases, caller())
        return pb.DeleteModelResponse(name=request.name, deleted_versions=versions)

    async def SetAlias(self, request, context):
        alias = await self.aliases.set(
            request.model, request.alias, request.version, request.canary_version, request.canary_percent, caller()
        )
        return alias_to_wire(alias)

    async def ListAliases(self, request, context):
        return pb.ListAliasesResponse(
            aliases=[alias_to_wire(a) for a in await self.aliases.list_aliases(request.model)]
        )

    async def DeleteAlias(self, request, context):
        return alias_to_wire(await self.aliases.delete(request.model, request.alias, caller()))

    async def ListAliasHistory(self, request, context):
        events = await self.aliases.history(request.model, request.alias)
        return pb.ListAliasHistoryResponse(changes=[alias_change_to_wire(e) for e in events])
