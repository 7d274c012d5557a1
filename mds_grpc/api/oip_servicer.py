"""inference.GRPCInferenceService (Open Inference Protocol, V2): converts and delegates to the core."""

from collections.abc import Awaitable, Callable

import numpy as np

from mds.oip import grpc_service_pb2 as pb
from mds.oip import grpc_service_pb2_grpc
from mds_grpc.api.auth import check_model
from mds_grpc.api.call_record import annotate
from mds_grpc.api.inference_servicer import deadline_of
from mds_grpc.api.oip import infer_response, input_arrays, model_metadata, parse_version
from mds_grpc.api.statuses import status_of
from mds_grpc.api.streams import in_order
from mds_grpc.core.errors import InvalidArgument, NotFound
from mds_grpc.core.inference import InferenceEngine
from mds_grpc.core.limits import TensorLimits


class OipServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        engine: InferenceEngine,
        is_ready: Callable[[], Awaitable[bool]],
        stream_max_in_flight: int,
        limits: TensorLimits,
    ):
        self.engine = engine
        self.registry = engine.registry
        self.is_ready = is_ready
        self.stream_max_in_flight = stream_max_in_flight
        self.limits = limits

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=await self.is_ready())

    async def _version(self, model: str, version: str) -> int:
        """The version V2's model_version selects, an alias's main version for metadata and readiness."""
        return await self.engine.aliases.version_for(model, *parse_version(version), canary=False)

    async def ModelReady(self, request, context):
        try:
            await self.registry.load(request.name, await self._version(request.name, request.version))
        except NotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        from importlib.metadata import version  # about 40 ms to import: paid here, not by every start

        providers = [f"execution_provider:{name}" for name in self.registry.available_providers]
        return pb.ServerMetadataResponse(name="mds", version=version("mds"), extensions=providers)

    async def ModelMetadata(self, request, context):
        record = await self.registry.get(request.name, await self._version(request.name, request.version))
        versions, _ = await self.registry.list_page(record.name, page_size=1000)
        return model_metadata(record, [r.version for r in versions])

    async def _infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        version, alias = parse_version(request.model_version)
        prediction = await self.engine.predict(
            request.model_name,
            version,
            input_arrays(request, self.limits),
            [o.name for o in request.outputs],
            deadline,
            alias,
            request.id,
        )
        structured = [name for name, value in prediction.outputs if not isinstance(value, np.ndarray)]
        if structured and request.outputs:
            raise InvalidArgument(
                f"output {structured[0]!r} is not a tensor, which V2 cannot carry; use mds.v1 Predict for it"
            )
        tensors = [(name, value) for name, value in prediction.outputs if isinstance(value, np.ndarray)]
        return infer_response(request, prediction.model, prediction.version, tensors)

    async def ModelInfer(self, request, context):
        annotate(request_id=request.id)
        response = await self._infer(request, deadline_of(context))
        annotate(version=int(response.model_version))
        return response

    async def ModelStreamInfer(self, request_iterator, context):
        deadline = deadline_of(context)

        async def handle(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                check_model(request.model_name)
                return pb.ModelStreamInferResponse(infer_response=await self._infer(request, deadline))
            except Exception as error:
                code, message = status_of(error)
                return pb.ModelStreamInferResponse(
                    error_message=f"{code.name}: {message}", infer_response=pb.ModelInferResponse(id=request.id)
                )

        async for reply in in_order(request_iterator, handle, self.stream_max_in_flight):
            yield reply
