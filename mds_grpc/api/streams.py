"""Bidirectional streams of independent requests: bounded concurrency, replies in request order."""

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Coroutine, Generator
from typing import Any, TypeVar

Request = TypeVar("Request")
Reply = TypeVar("Reply")


class _Resumed:
    """Carries on a coroutine that `started` ran up to its first wait, from the future it waits on."""

    __slots__ = ("work", "waits_on")

    def __init__(self, work: Coroutine[Any, Any, Reply], waits_on: Any):
        self.work, self.waits_on = work, waits_on

    def __await__(self) -> Generator[Any, Any, Reply]:
        waits_on = self.waits_on
        while True:  # what `yield from` does, from the second step on
            try:
                sent = yield waits_on
            except BaseException as error:  # cancellation, or the awaited future's failure
                try:
                    waits_on = self.work.throw(error)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    waits_on = self.work.send(sent)
                except StopIteration as done:
                    return done.value


async def _resume(work: Coroutine[Any, Any, Reply], waits_on: Any) -> Reply:
    return await _Resumed(work, waits_on)


def started(work: Coroutine[Any, Any, Reply]) -> asyncio.Future[Reply]:
    """`work`, run here up to its first wait: a finished future when it needed none (no task, no turn of the
    event loop: a model run inline), else a task that carries it on (Python 3.12's eager tasks, by hand)."""
    loop = asyncio.get_running_loop()
    try:
        waits_on = work.send(None)
    except StopIteration as done:
        finished: asyncio.Future[Reply] = loop.create_future()
        finished.set_result(done.value)
        return finished
    except Exception as error:
        failed: asyncio.Future[Reply] = loop.create_future()
        failed.set_exception(error)
        return failed
    return asyncio.ensure_future(_resume(work, waits_on))


async def in_order(
    requests: AsyncIterable[Request], handle: Callable[[Request], Coroutine[Any, Any, Reply]], max_in_flight: int
) -> AsyncGenerator[Reply, None]:
    """Yield `handle(request)` for each request, in order, with up to `max_in_flight` running at once.

    `handle(request)` is called as each request is read, before it waits for a slot; its work starts once it
    has one (see `started`). While every request's work finishes without waiting (a model run inline), each
    is handled as it is read, and its reply sent, in this one coroutine: no task, no queue. From the first
    that waits, a reader task reads ahead of the replies.

    A request counts until its reply is taken, so no more than `max_in_flight` are read ahead of
    the reply being sent. `handle` must turn its own failures into replies; an error reading the
    requests ends the stream.
    """
    iterator = aiter(requests)
    async for request in iterator:
        work = started(handle(request))
        if not work.done():
            async for reply in _read_ahead(iterator, handle, max_in_flight, work):
                yield reply
            return
        yield work.result()


async def _read_ahead(
    requests: AsyncIterator[Request],
    handle: Callable[[Request], Coroutine[Any, Any, Reply]],
    max_in_flight: int,
    first: asyncio.Future[Reply],
) -> AsyncGenerator[Reply, None]:
    """in_order from a request whose work waits (`first`, holding a slot), with a reader task reading ahead."""
    slots = asyncio.Semaphore(max_in_flight - 1)
    pending: asyncio.Queue = asyncio.Queue()
    pending.put_nowait(first)

    async def read():
        try:
            async for request in requests:
                work = handle(request)  # its arguments taken now; it starts once it has a slot
                try:
                    await slots.acquire()
                except BaseException:
                    work.close()
                    raise
                pending.put_nowait(started(work))
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
