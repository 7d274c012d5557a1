"""One interceptor for every mds RPC: maps core errors to gRPC statuses and writes one access line."""

import asyncio
import contextvars
import logging
import time
import uuid
from contextlib import asynccontextmanager

import grpc

from mds_grpc import metrics
from mds_grpc.core.errors import MdsError

log = logging.getLogger("mds.access")
errors_log = logging.getLogger("mds.errors")
_fields: contextvars.ContextVar[dict] = contextvars.ContextVar("access_fields")
_REQUEST_FIELDS = (("model", "model"), ("name", "model"), ("version", "version"), ("request_id", "request_id"),
                   ("id", "job"))


def annotate(**fields) -> None:
    """Add fields (model, version, ...) to the current RPC's access line."""
    current = _fields.get(None)
    if current is not None:
        current.update(fields)


def status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message for an error raised while serving a request."""
    if isinstance(error, MdsError):
        return grpc.StatusCode[error.status], str(error)
    incident = uuid.uuid4().hex[:12]
    errors_log.error("internal error %s", incident, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error {incident}; the server log has details"


@asynccontextmanager
async def _rpc_scope(method: str, request, context: grpc.aio.ServicerContext, guard):
    start = time.perf_counter()
    fields = {target: value for source, target in _REQUEST_FIELDS if (value := getattr(request, source, None))}
    _fields.set(fields)
    code = None
    try:
        if guard is not None:
            await guard(method, request, context)
        yield
    except grpc.aio.AbortError:
        raise
    except asyncio.CancelledError:
        code = grpc.StatusCode.CANCELLED
        raise
    except Exception as error:
        code, message = status_of(error)
        await context.abort(code, message)
    finally:
        code = (code or context.code() or grpc.StatusCode.OK).name
        seconds = time.perf_counter() - start
        # Only served models label metrics: names from failed requests are unbounded.
        metrics.observe_rpc(method, str(fields.get("model", "")) if code == "OK" else "", code, seconds)
        log.info("rpc", extra={"method": method, **fields, "code": code, "duration_ms": round(seconds * 1000, 3)})


def _wrap(method: str, handler: grpc.RpcMethodHandler, guard) -> grpc.RpcMethodHandler:
    if handler.unary_unary or handler.stream_unary:
        inner = handler.unary_unary or handler.stream_unary

        async def unary_response(request, context):
            async with _rpc_scope(method, request, context, guard):
                return await inner(request, context)

        factory = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
        return factory(unary_response, handler.request_deserializer, handler.response_serializer)

    inner = handler.unary_stream or handler.stream_stream

    async def stream_response(request, context):
        async with _rpc_scope(method, request, context, guard):
            async for response in inner(request, context):
                yield response

    factory = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
    return factory(stream_response, handler.request_deserializer, handler.response_serializer)


class AccessLogInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the handlers of methods under `prefixes`; health and reflection pass untouched.

    `guard(method, request, context)`, when given, runs first (authentication and authorization).
    """

    def __init__(self, prefixes: tuple[str, ...], guard=None):
        self.prefixes = prefixes
        self.guard = guard
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefixes):
            return handler
        if details.method not in self._wrapped:
            self._wrapped[details.method] = _wrap(details.method, handler, self.guard)
        return self._wrapped[details.method]
