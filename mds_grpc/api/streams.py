"""Bidirectional streams of independent requests: bounded concurrency, replies in request order."""

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable
from typing import TypeVar

Request = TypeVar("Request")
Reply = TypeVar("Reply")


async def in_order(
    requests: AsyncIterable[Request], handle: Callable[[Request], Awaitable[Reply]], max_in_flight: int
) -> AsyncGenerator[Reply, None]:
    """Yield `handle(request)` for each request, in order, with up to `max_in_flight` running at once.

    A request counts until its reply is taken, so no more than `max_in_flight` are read ahead of
    the reply being sent. `handle` must turn its own failures into replies; an error reading the
    requests ends the stream.
    """
    slots = asyncio.Semaphore(max_in_flight)
    pending: asyncio.Queue = asyncio.Queue()

    async def read():
        try:
            async for request in requests:
                await slots.acquire()
                pending.put_nowait(asyncio.ensure_future(handle(request)))
        finally:
            pending.put_nowait(None)

    reader = asyncio.ensure_future(read())
    try:
        while (reply := await pending.get()) is not None:
            try:
                done = await reply
            finally:
                slots.release()
            yield done
        await reader  # surfaces a broken request stream
    finally:
        reader.cancel()
        while not pending.empty():
            if (reply := pending.get_nowait()) is not None:
                reply.cancel()
