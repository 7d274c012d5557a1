"""PredictStream over a WebSocket at /v1/predictions:ws: converts frames and delegates to InferenceServicer.stream.

Each frame carries one message: a text frame a PredictRequest in proto JSON, a binary frame one in
protobuf. Replies are PredictStreamResponses, in request order: proto JSON unless the client chose the
`mds.v1.proto` subprotocol. A connection that cannot be served (no valid API key, a bad `timeout`)
closes with code 4000 + the gRPC status code and the message as reason (see docs/websocket.md).
GET /health on the same port answers what gRPC health says of the server: 200, or 503 (draining, a backend down).
"""

import asyncio
import contextlib
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2
from websockets import ConnectionClosed, ConnectionClosedOK, Subprotocol
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from mds.v1 import inference_service_pb2 as pb
from mds_grpc.api import call_record
from mds_grpc.api.auth import Guard
from mds_grpc.api.inference_servicer import InferenceServicer
from mds_grpc.api.statuses import status_of
from mds_grpc.core.errors import InvalidArgument, MdsError, Unauthenticated
from mds_grpc.logs import AccessLog

PATH = "/v1/predictions:ws"
JSON, PROTO = Subprotocol("mds.v1.json"), Subprotocol("mds.v1.proto")
KEY_PROTOCOL = "mds.v1.bearer."  # browsers cannot set headers: the key may come as subprotocol mds.v1.bearer.<key>
METHOD = "/mds.v1.InferenceService/PredictStream"  # its scope, its access-log and metrics name
CLOSE_STATUS_BASE = 4000  # a connection refused with gRPC status code c closes with 4000 + c
MAX_REASON_BYTES = 123  # what a close frame holds
MAX_JSON_CHARS = 4 * 2**20  # proto JSON is parsed in pure Python: big tensors belong in binary frames
# Up to this size (characters of a request's JSON, bytes of a reply's protobuf), JSON is converted on the event
# loop (about 1 ms here, a hop to a thread 0.1 to 0.3 ms); beyond it, in a thread, so gRPC calls go on meanwhile.
INLINE_JSON_CHARS = 2**11
CLOSE_SECONDS = 2.0  # how long a closing connection waits for the client's close frame
HEALTH_PATH = "/health"
log = logging.getLogger("mds.websocket")
log.setLevel(logging.WARNING)  # the library logs each connection at INFO; the access log has them


def select_subprotocol(connection: ServerConnection, offered) -> Subprotocol | None:
    """The first of mds.v1.json and mds.v1.proto the client offers; none (JSON) when it offers neither."""
    return next((p for p in offered if p in (JSON, PROTO)), None)


def authorization(request: Request) -> str | None:
    """The `authorization` header, else a key offered as subprotocol mds.v1.bearer.<key>."""
    if header := request.headers.get("authorization"):
        return header
    offered = (p.strip() for value in request.headers.get_all("sec-websocket-protocol") for p in value.split(","))
    key = next((p.removeprefix(KEY_PROTOCOL) for p in offered if p.startswith(KEY_PROTOCOL)), None)
    return None if key is None else f"Bearer {key}"


def request_timeout(request: Request) -> float | None:
    """`?timeout=SECONDS`: each request's deadline, counted from when the server reads it."""
    values = parse_qs(urlsplit(request.path).query).get("timeout")
    if not values:
        return None
    try:
        seconds = float(values[-1])
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise InvalidArgument(f"timeout must be a positive number of seconds, got {values[-1]!r}")
    return seconds


def decode(frame: str | bytes, number: int) -> pb.PredictRequest | MdsError:
    """The request a frame carries, or the InvalidArgument that answers it."""
    try:
        if isinstance(frame, str):
            return json_format.Parse(frame, pb.PredictRequest())
        return pb.PredictRequest.FromString(frame)
    except (json_format.ParseError, DecodeError) as error:
        kind = "proto JSON (a text frame)" if isinstance(frame, str) else "protobuf (a binary frame)"
        return InvalidArgument(f"message {number} is not a PredictRequest in {kind}: {error}")


async def read(frame: str | bytes, number: int) -> pb.PredictRequest | MdsError:
    """decode(), with big JSON off the event loop and JSON over MAX_JSON_CHARS refused."""
    if isinstance(frame, bytes) or len(frame) <= INLINE_JSON_CHARS:
        return decode(frame, number)
    if len(frame) > MAX_JSON_CHARS:
        return InvalidArgument(
            f"message {number} is {len(frame)} characters of proto JSON; a text frame holds at most {MAX_JSON_CHARS} "
            "characters (4 MiB): send big tensors as protobuf in binary frames (subprotocol mds.v1.proto)"
        )
    return await asyncio.to_thread(decode, frame, number)


def encoder(subprotocol: str | None) -> Callable[[pb.PredictStreamResponse], Awaitable[str | bytes]]:
    """The frame of a reply: protobuf with mds.v1.proto, else proto JSON (off the event loop when big)."""

    async def encode(reply: pb.PredictStreamResponse) -> str | bytes:
        if subprotocol == PROTO:
            return reply.SerializeToString()
        if reply.ByteSize() <= INLINE_JSON_CHARS:
            return json_format.MessageToJson(reply, indent=None)
        return await asyncio.to_thread(json_format.MessageToJson, reply, indent=None)

    return encode


class PredictionSocket:
    """The WebSocket front door of PredictStream; `guard` (None: auth off) checks each connection's key,
    `health` is the server's gRPC health, which GET /health reports."""

    def __init__(
        self,
        servicer: InferenceServicer,
        guard: Guard | None,
        access: AccessLog,
        health: grpc_health.aio.HealthServicer,
    ):
        self.servicer, self.guard, self.access, self.health = servicer, guard, access, health
        self.stopping = asyncio.Event()
        self.server: Server | None = None
        self.handlers: dict[asyncio.Task, ServerConnection] = {}

    async def start(self, host: str, port: int, max_message_bytes: int, tls: ssl.SSLContext | None, shared: bool):
        """Listen (with `shared`, on a port other serving processes share); exit with one line when it cannot."""
        try:
            self.server = await serve(
                self.handle,
                host.strip("[]"),
                port,
                select_subprotocol=select_subprotocol,
                process_request=self.check_path,
                compression=None,  # tensors barely compress, and it costs each frame CPU time
                max_size=max_message_bytes,
                max_queue=1,  # frames read ahead of the handler: in_order already keeps requests in flight
                close_timeout=CLOSE_SECONDS,
                ssl=tls,
                reuse_port=shared,
                logger=log,
            )
        except OSError as error:
            raise SystemExit(
                f"error: cannot listen on {host}:{port} (MDS_GRPC_HOST, MDS_WEBSOCKET_PORT): {error.strerror or error}"
            ) from None

    async def stop(self, grace_seconds: float) -> None:
        """Stop accepting; connections stop reading, send the replies in flight and close with 1001 (going away)."""
        if self.server is None:
            return
        self.stopping.set()
        self.server.close(close_connections=False)
        try:
            await asyncio.wait_for(self.server.wait_closed(), grace_seconds)
        except TimeoutError:  # requests still running after the grace period are cancelled, their replies dropped
            for handler in self.handlers:
                handler.cancel()  # each then closes its connection with 1001
            try:
                await asyncio.wait_for(self.server.wait_closed(), CLOSE_SECONDS)
            except TimeoutError:  # a client that reads nothing cannot even take its close frame
                for connection in self.handlers.values():
                    connection.transport.abort()
                await self.server.wait_closed()

    async def check_path(self, connection: ServerConnection, request: Request) -> Response | None:
        """404 but for PATH; GET /health: 200 while gRPC health says SERVING, else 503 (Envoy's health check)."""
        path = urlsplit(request.path).path
        if path == HEALTH_PATH:
            # Check needs a context only for a service it does not know; it always knows "" (the whole server).
            status = (await self.health.Check(health_pb2.HealthCheckRequest(), None)).status  # type: ignore[arg-type]
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            return connection.respond(200 if status == health_pb2.HealthCheckResponse.SERVING else 503, f"{name}\n")
        if path != PATH:
            return connection.respond(404, f"not found: WebSocket streaming is at {PATH}\n")
        return None

    async def handle(self, connection: ServerConnection) -> None:
        handler = asyncio.current_task()
        assert handler is not None  # stop() cancels it after the grace period, or aborts its connection
        self.handlers[handler] = connection
        try:
            await self.stream_predictions(connection)
            if self.stopping.is_set():  # a no-op when closed already
                await connection.close(1001, "server shutting down")
        finally:
            del self.handlers[handler]

    async def stream_predictions(self, connection: ServerConnection) -> None:
        """Stream the connection's predictions; one access line."""
        fields: dict = {"transport": "websocket"}
        call_record.start(fields)
        start, code = time.perf_counter(), "OK"
        assert connection.request is not None  # after the handshake
        try:
            timeout = request_timeout(connection.request)
            if self.guard is not None:
                if (key := authorization(connection.request)) is None:
                    raise Unauthenticated(
                        f"missing API key: send the header 'authorization: Bearer <key>' or offer the "
                        f"subprotocol {KEY_PROTOCOL}<key>"
                    )
                await self.guard.check(METHOD, key)
            encode = encoder(connection.subprotocol)
            deadline = (lambda: None) if timeout is None else (lambda: time.monotonic() + timeout)
            # Closed here, not by the garbage collector: its counts must reach the access line.
            async with contextlib.aclosing(self.servicer.stream(self._requests(connection), deadline)) as replies:
                async for reply in replies:
                    await connection.send(await encode(reply))
        except (ConnectionClosed, asyncio.CancelledError):
            code = "CANCELLED"  # the client left before its last reply, or the server stopped waiting
        except Exception as error:
            status, message = status_of(error)
            code = status.name
            reason = message.encode()[:MAX_REASON_BYTES].decode(errors="ignore")
            await connection.close(CLOSE_STATUS_BASE + status.value[0], reason)
        finally:
            call_record.finish(self.access, METHOD, fields, code, time.perf_counter() - start)

    async def _requests(self, connection: ServerConnection) -> AsyncIterator[pb.PredictRequest | MdsError]:
        """The connection's requests until the client closes it or the server stops."""
        stopping = asyncio.ensure_future(self.stopping.wait())
        try:
            number = 0
            while not self.stopping.is_set():
                receiving = asyncio.ensure_future(connection.recv())
                await asyncio.wait((receiving, stopping), return_when=asyncio.FIRST_COMPLETED)
                if not receiving.done():
                    receiving.cancel()  # safe: a frame not yet returned stays for the next recv
                    return
                try:
                    frame = receiving.result()
                except ConnectionClosedOK:
                    return  # the client is done
                number += 1
                yield await read(frame, number)
        finally:
            stopping.cancel()
