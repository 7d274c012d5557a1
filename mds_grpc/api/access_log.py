"""Wraps every mds RPC handler: the guard first, core errors mapped to gRPC statuses, one access line."""

import asyncio
import contextvars
import logging
import time
import uuid
from dataclasses import dataclass

import grpc

from mds_grpc import metrics
from mds_grpc.api import contract
from mds_grpc.core.errors import MdsError
from mds_grpc.logs import AccessLog

errors_log = logging.getLogger("mds.errors")
_fields: contextvars.ContextVar[dict] = contextvars.ContextVar("access_fields")
# Besides the field the contract marks as naming the model (logged as `model`):
_REQUEST_FIELDS = (("version", "version"), ("request_id", "request_id"), ("id", "job"))


def annotate(**fields) -> None:
    """Add fields (model, version, ...) to the current RPC's access line."""
    current = _fields.get(None)
    if current is not None:
        current.update(fields)


# A status message travels in metadata, which gRPC caps at 16 KiB in all and where each
# non-ASCII byte is percent-encoded (3 characters; up to 12 for one character).
MAX_MESSAGE_CHARS = 2000
MAX_NON_ASCII_MESSAGE_CHARS = 500


def status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message for an error raised while serving a request."""
    if isinstance(error, MdsError):
        message = str(error)
        limit = MAX_MESSAGE_CHARS if message.isascii() else MAX_NON_ASCII_MESSAGE_CHARS
        if len(message) > limit:
            message = message[:limit] + f"... ({len(message)} characters in all)"
        return grpc.StatusCode[error.status], message
    incident = uuid.uuid4().hex[:12]
    errors_log.error("internal error %s", incident, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error {incident}; the server log has details"


@dataclass(frozen=True)
class _Route:
    """What every call of one method shares: its name, guard, access log and the request fields it logs."""

    method: str
    guard: object
    access: AccessLog | None
    logged: tuple[tuple[str, str], ...]  # (request field, access-line field) the request message has


class _RpcScope:
    """One RPC: runs the guard on entry; on exit turns an error into its status and records the call."""

    __slots__ = ("route", "request", "context", "fields", "start")

    def __init__(self, route: _Route, request, context: grpc.aio.ServicerContext):
        self.route, self.request, self.context = route, request, context

    async def __aenter__(self) -> None:
        self.start = time.perf_counter()
        self.fields = {target: value for source, target in self.route.logged
                       if (value := getattr(self.request, source))}
        _fields.set(self.fields)
        if self.route.guard is not None:
            try:
                await self.route.guard(self.route.method, self.request, self.context)
            except BaseException as error:  # the with-block never starts, so __aexit__ would not run
                await self.__aexit__(type(error), error, error.__traceback__)
                raise

    async def __aexit__(self, kind, error, traceback) -> None:
        code = None
        try:
            if isinstance(error, asyncio.CancelledError):
                code = grpc.StatusCode.CANCELLED
            elif isinstance(error, Exception) and not isinstance(error, grpc.aio.AbortError):
                code, message = status_of(error)
                await self.context.abort(code, message)
        finally:
            self._record((code or self.context.code() or grpc.StatusCode.OK).name)

    def _record(self, code: str) -> None:
        route = self.route
        if route.access is None:  # a probe: no access line, no metrics
            return
        seconds = time.perf_counter() - self.start
        # Only served models label metrics: names from failed requests are unbounded.
        metrics.observe_rpc(route.method, str(self.fields.get("model", "")) if code == "OK" else "", code, seconds)
        route.access.write({"method": route.method, **self.fields, "code": code, "duration_ms": round(seconds * 1000, 3)})


def _wrap(method: str, handler: grpc.RpcMethodHandler, guard, access: AccessLog | None) -> grpc.RpcMethodHandler:
    # A unary request is a message whose class the deserializer (`Message.FromString`) is bound to.
    message_class = getattr(handler.request_deserializer, "__self__", None)
    present = message_class.DESCRIPTOR.fields_by_name if message_class and (
        handler.unary_unary or handler.unary_stream) else {}
    model = contract.model_field(message_class.DESCRIPTOR) if present else None
    logged = ((model, "model"),) if model else ()
    logged += tuple(pair for pair in _REQUEST_FIELDS if pair[0] in present
                    and not (pair[0] == "id" and method.startswith("/inference.")))  # there `id` is a request id
    route = _Route(method, guard, access, logged)
    if handler.unary_unary or handler.stream_unary:
        inner = handler.unary_unary or handler.stream_unary

        async def unary_response(request, context):
            async with _RpcScope(route, request, context):
                return await inner(request, context)

        factory = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
        return factory(unary_response, handler.request_deserializer, handler.response_serializer)

    inner = handler.unary_stream or handler.stream_stream

    async def stream_response(request, context):
        async with _RpcScope(route, request, context):
            async for response in inner(request, context):
                yield response

    factory = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
    return factory(stream_response, handler.request_deserializer, handler.response_serializer)


class ServedServer:
    """Stands in for the server while a generated `add_*Servicer_to_server` runs, wrapping each handler.

    Wrapping at registration costs nothing per call, unlike a server interceptor. `guard(method,
    request, context)`, when given, runs first (authentication and authorization); without
    `access`, calls leave no access line and no metrics.
    """

    def __init__(self, server: grpc.aio.Server, guard, access: AccessLog | None):
        self.server, self.guard, self.access = server, guard, access

    def add_generic_rpc_handlers(self, handlers) -> None:
        """Ignored: add_registered_method_handlers receives the same handlers and adds the wrapped ones."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        wrapped = {name: _wrap(f"/{service}/{name}", handler, self.guard, self.access)
                   for name, handler in handlers.items()}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        self.server.add_registered_method_handlers(service, wrapped)
