"""HTTP request bodies streamed through Envoy's transcoder (google.api.HttpBody pieces): plain, or
multipart/form-data parsed incrementally into named parts."""

from collections.abc import AsyncIterable, AsyncIterator
from typing import TYPE_CHECKING, NamedTuple

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from mds_grpc.core.errors import InvalidArgument

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks


class Piece(NamedTuple):
    """The next bytes of a multipart body's part number `part` (from 0), named `name`; `last` ends it."""

    part: int
    name: str
    data: bytes
    last: bool


def boundary_of(content_type: str) -> bytes | None:
    """The boundary of a multipart/form-data body; None for any other content type."""
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        return None
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidArgument("a multipart/form-data body needs a boundary in its Content-Type")
    return boundary


class _Parts:
    """MultipartParser's callbacks, collecting the pieces of one written chunk."""

    def __init__(self):
        self.pieces: list[Piece] = []
        self.part = -1
        self.name = ""
        self.header_field = b""
        self.header_value = b""
        self.disposition = b""
        self.ended = False

    def callbacks(self) -> "MultipartCallbacks":
        return {
            "on_part_begin": self.begin,
            "on_header_field": lambda data, start, end: self._add_field(data[start:end]),
            "on_header_value": lambda data, start, end: self._add_value(data[start:end]),
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": lambda data, start, end: self.pieces.append(
                Piece(self.part, self.name, bytes(data[start:end]), False)
            ),
            "on_part_end": lambda: self.pieces.append(Piece(self.part, self.name, b"", True)),
            "on_end": self.end,
        }

    def begin(self) -> None:
        self.part += 1
        self.disposition = b""

    def _add_field(self, data: bytes) -> None:
        self.header_field += data

    def _add_value(self, data: bytes) -> None:
        self.header_value += data

    def header_end(self) -> None:
        if self.header_field.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_field = self.header_value = b""

    def headers_finished(self) -> None:
        _, params = parse_options_header(self.disposition)
        name = params.get(b"name", b"")
        if not name:
            raise InvalidArgument(f"multipart part {self.part + 1} has no name in its Content-Disposition header")
        try:
            self.name = name.decode()
        except UnicodeDecodeError:
            raise InvalidArgument(f"multipart part {self.part + 1} has a name that is not UTF-8") from None

    def end(self) -> None:
        self.ended = True


async def form_pieces(boundary: bytes, chunks: AsyncIterable[bytes]) -> AsyncIterator[Piece]:
    """The pieces of a multipart/form-data body as its chunks arrive; INVALID_ARGUMENT when it is malformed
    or ends before its closing boundary (a client cut off)."""
    parts = _Parts()
    try:
        parser = MultipartParser(boundary, parts.callbacks())  # refuses a boundary over 256 bytes
    except FormParserError as error:
        raise InvalidArgument(f"malformed multipart/form-data Content-Type: {error}") from None
    async for chunk in chunks:
        try:
            parser.write(chunk)
        except FormParserError as error:
            raise InvalidArgument(f"malformed multipart/form-data body: {error}") from None
        for piece in parts.pieces:
            yield piece
        parts.pieces.clear()
    if not parts.ended:
        raise InvalidArgument("the multipart/form-data body ends before its closing boundary")


async def body_chunks(first: bytes, rest: AsyncIterable) -> AsyncIterator[bytes]:
    """The bytes of an HTTP body: the first message's, then each later message's `body.data`."""
    yield first
    async for message in rest:
        yield message.body.data
