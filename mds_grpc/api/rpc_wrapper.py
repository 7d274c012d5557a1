"""Wraps every served RPC handler at registration: the guard first, errors turned into statuses, a call record."""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import grpc

from mds_grpc.api import call_record
from mds_grpc.api.contract import Rpc
from mds_grpc.api.statuses import status_of
from mds_grpc.logs import AccessLog

# Besides the field the contract marks as naming the model (logged as `model`):
_REQUEST_FIELDS = (("version", "version"), ("request_id", "request_id"), ("id", "job"))

# guard(method, request, context): raises (or aborts) to refuse the call.
_Guard = Callable[[str, Any, grpc.aio.ServicerContext], Awaitable[None]]
# grpc's stubs type handlers for the sync server; under grpc.aio a streaming one is an async generator.
_AsyncStreaming = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]


@dataclass(frozen=True)
class _Route:
    """What every call of one method shares: its name, access log and the request fields it logs."""

    method: str
    access: AccessLog | None
    logged: tuple[tuple[str, str], ...]  # (request field, access-line field) the request message has


class _RpcScope:
    """One RPC's record: `fail` turns an error into its status, and it or `finish` records the call.

    Plain methods, not an async context manager: a call that passes pays for no extra coroutine.
    """

    __slots__ = ("route", "context", "fields", "start")

    def __init__(self, route: _Route, request, context: grpc.aio.ServicerContext):
        self.route, self.context = route, context
        self.start = time.perf_counter()
        self.fields = {target: value for source, target in route.logged if (value := getattr(request, source))}
        call_record.start(self.fields)

    async def fail(self, error: BaseException) -> None:
        """The call ends with `error`: abort with its status (unless it is one already), and record it."""
        code = None
        try:
            if isinstance(error, asyncio.CancelledError):
                code = grpc.StatusCode.CANCELLED
            elif isinstance(error, Exception) and not isinstance(error, grpc.aio.AbortError):
                code, message = status_of(error)
                await self.context.abort(code, message)
        finally:
            self.finish(code)

    def finish(self, code: grpc.StatusCode | None = None) -> None:
        if self.route.access is not None:  # else a probe: no access line, no metrics
            code = code or self.context.code() or grpc.StatusCode.OK
            call_record.finish(
                self.route.access, self.route.method, self.fields, code.name, time.perf_counter() - self.start
            )


def _wrap(
    method: str, rpc: Rpc, handler: grpc.RpcMethodHandler, guard: _Guard | None, access: AccessLog | None
) -> grpc.RpcMethodHandler:
    # A unary request is a message whose class the deserializer (`Message.FromString`) is bound to.
    message_class = getattr(handler.request_deserializer, "__self__", None)
    present = (
        message_class.DESCRIPTOR.fields_by_name
        if message_class and (handler.unary_unary or handler.unary_stream)
        else {}
    )
    logged: tuple[tuple[str, str], ...] = ((rpc.model_field, "model"),) if rpc.model_field else ()
    logged += tuple(
        pair
        for pair in _REQUEST_FIELDS
        if pair[0] in present and not (pair[0] == "id" and method.startswith("/inference."))
    )  # there `id` is a request id
    route = _Route(method, access, logged)
    unary = handler.unary_unary or handler.stream_unary
    if unary is not None:

        async def unary_response(request, context):
            scope = _RpcScope(route, request, context)
            try:
                if guard is not None:
                    await guard(method, request, context)
                response = await unary(request, context)
            except BaseException as error:
                await scope.fail(error)
                raise
            scope.finish()
            return response

        factory = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
        return factory(unary_response, handler.request_deserializer, handler.response_serializer)

    streaming = cast(_AsyncStreaming, handler.unary_stream or handler.stream_stream)

    async def stream_response(request, context):
        scope = _RpcScope(route, request, context)
        try:
            if guard is not None:
                await guard(method, request, context)
            async for response in streaming(request, context):
                yield response
        except BaseException as error:
            await scope.fail(error)
            raise
        scope.finish()

    factory = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
    return factory(stream_response, handler.request_deserializer, handler.response_serializer)


class ServedServer:
    """Stands in for the server while a generated `add_*Servicer_to_server` runs, wrapping each handler.

    Wrapping at registration costs nothing per call, unlike a server interceptor. `rpcs` is the
    contract's table (contract.rpcs): a method missing from it is refused at start. `guard(method,
    request, context)`, when given, runs first (authentication and authorization); without
    `access`, calls leave no access line and no metrics.
    """

    def __init__(self, server: grpc.aio.Server, rpcs: dict[str, Rpc], guard: _Guard | None, access: AccessLog | None):
        self.server, self.rpcs, self.guard, self.access = server, rpcs, guard, access

    def add_generic_rpc_handlers(self, handlers) -> None:
        """Ignored: add_registered_method_handlers receives the same handlers and adds the wrapped ones."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        missing = [f"/{service}/{name}" for name in handlers if f"/{service}/{name}" not in self.rpcs]
        if missing:
            raise SystemExit(f"error: {missing[0]} is served but not in the contract's table of scopes")
        wrapped = {
            name: _wrap(f"/{service}/{name}", self.rpcs[f"/{service}/{name}"], handler, self.guard, self.access)
            for name, handler in handlers.items()
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        # grpc.aio.Server has it (the generated add_*Servicer_to_server calls it); grpc's stubs lack it.
        self.server.add_registered_method_handlers(service, wrapped)  # type: ignore[attr-defined]
