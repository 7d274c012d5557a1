"""mds.v1.InferenceService: converts and delegates to the inference engine."""

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterable, Callable

import grpc
import numpy as np
from google.protobuf import json_format, struct_pb2
from google.rpc import status_pb2

from mds.v1 import inference_service_pb2 as pb
from mds.v1 import inference_service_pb2_grpc, tensor_pb2
from mds_grpc.api.auth import check_model
from mds_grpc.api.call_record import annotate
from mds_grpc.api.statuses import status_of
from mds_grpc.api.streams import in_order
from mds_grpc.api.tensors import from_array, to_arrays
from mds_grpc.core.errors import MdsError
from mds_grpc.core.inference import InferenceEngine, Prediction
from mds_grpc.core.limits import TensorLimits


def wants_raw(request: pb.PredictRequest) -> bool:
    """Unspecified: raw when every input came without typed contents (reading raw_data would copy it)."""
    if request.output_encoding == tensor_pb2.TENSOR_ENCODING_UNSPECIFIED:
        for tensor in request.inputs:  # a loop: a generator costs more than the one input most requests have
            if tensor.HasField("contents"):
                return False
        return bool(request.inputs)
    return request.output_encoding == tensor_pb2.TENSOR_ENCODING_RAW


def encode_prediction(prediction: Prediction, request: pb.PredictRequest, response: pb.PredictResponse) -> None:
    """Fill `response` in place (appending a built message to a reply would copy it)."""
    response.model, response.version, response.request_id = prediction.model, prediction.version, request.request_id
    raw = wants_raw(request)
    for name, value in prediction.outputs:
        if isinstance(value, np.ndarray):
            from_array(name, value, raw, into=response.outputs.add())
        else:  # sequences and maps, e.g. ZipMap: JSON-like values with string keys
            response.structured_outputs[name].CopyFrom(json_format.ParseDict(_jsonable(value), struct_pb2.Value()))


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class InferenceServicer(inference_service_pb2_grpc.InferenceServiceServicer):
    def __init__(self, engine: InferenceEngine, stream_max_in_flight: int, limits: TensorLimits):
        self.engine = engine
        self.stream_max_in_flight = stream_max_in_flight
        self.limits = limits

    async def _predict(self, request: pb.PredictRequest, deadline: float | None, response: pb.PredictResponse) -> None:
        prediction = await self.engine.predict(
            request.model,
            request.version,
            to_arrays(request.inputs, self.limits),
            list(request.output_names),
            deadline,
            request.alias,
            request.request_id,
        )
        encode_prediction(prediction, request, response)

    async def Predict(self, request, context):
        response = pb.PredictResponse()
        await self._predict(request, deadline_of(context), response)
        annotate(version=response.version)
        return response

    async def _stream_item(
        self, request: pb.PredictRequest | MdsError, deadline: float | None
    ) -> pb.PredictStreamResponse:
        reply = pb.PredictStreamResponse()
        try:
            if isinstance(request, MdsError):  # a message that could not be read
                raise request
            reply.request_id = request.request_id
            check_model(request.model)
            await self._predict(request, deadline, reply.response)
        except Exception as error:
            code, message = status_of(error)
            reply.error.CopyFrom(status_pb2.Status(code=code.value[0], message=message))  # replaces `response`
        return reply

    async def stream(
        self, requests: AsyncIterable[pb.PredictRequest | MdsError], deadline: Callable[[], float | None]
    ) -> AsyncGenerator[pb.PredictStreamResponse, None]:
        """PredictStream's replies, whatever carries it: in request order, each request's failure in its reply.

        An MdsError in place of a request (one the front door could not read) is that request's failure.
        `deadline()` is asked as each request is read, before it waits for an in-flight slot (a
        time.monotonic() value, or None).
        """
        count = errors = 0
        replies = in_order(requests, lambda request: self._stream_item(request, deadline()), self.stream_max_in_flight)
        try:
            async with contextlib.aclosing(replies):  # closing this stream stops its requests at once
                async for reply in replies:
                    count += 1
                    errors += reply.HasField("error")
                    yield reply
        finally:
            annotate(messages=count, errors=errors)

    def PredictStream(self, request_iterator, context):
        deadline = deadline_of(context)
        return self.stream(request_iterator, lambda: deadline)  # the wrapper iterates it: no layer of its own
