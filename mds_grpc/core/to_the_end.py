"""Clean-up that a cancellation cannot cut short."""

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def to_the_end(work: Awaitable[T]) -> T:
    """Await `work` until it is done even if this task is cancelled meanwhile, then re-raise the cancellation.

    A plain `await asyncio.to_thread(cleanup)` is cut short by a cancellation that lands while the
    cleanup waits for a thread, and a cleanup that never started leaves files behind. gRPC cancels a
    handler when its client goes away, which can land just as the handler is cleaning up after the
    end of its request stream.
    """
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return task.result()
