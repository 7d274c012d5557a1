"""Dynamic batching: concurrent requests for one model version run together in one onnxruntime call."""

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from mds_grpc.core.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from mds_grpc.core.model_cache import LoadedModel
from mds_grpc.core.records import BatchingPolicy, TensorSpec

MAX_QUEUE_DELAY_US = 1_000_000

RunBatch = Callable[[LoadedModel, dict[str, np.ndarray], list[str]], Awaitable[list]]


def check_policy(policy: BatchingPolicy, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> None:
    """Raise InvalidArgument unless the model can be batched: every tensor's first dimension is dynamic."""
    if not policy.enabled:
        return
    if policy.max_queue_delay_us > MAX_QUEUE_DELAY_US:
        raise InvalidArgument(
            f"batching.max_queue_delay_us must be at most {MAX_QUEUE_DELAY_US} (one second), "
            f"got {policy.max_queue_delay_us}"
        )
    for kind, specs in (("input", inputs), ("output", outputs)):
        for spec in specs:
            if spec.dtype is None or not spec.shape or spec.shape[0] >= 0:
                raise InvalidArgument(
                    f"batching needs every input and output to be a tensor whose first dimension is dynamic; "
                    f"{kind} {spec.name!r} is {spec.onnx_type} with shape {list(spec.shape)}: "
                    "upload it with batching off"
                )


@dataclass(eq=False)
class _Waiting:
    model: LoadedModel  # as loaded for this request: a batch runs on its first request's session
    inputs: dict[str, np.ndarray]
    rows: int
    deadline: float | None  # time.monotonic()
    reply: asyncio.Future


class Batcher:
    """Queues requests for one model version and runs up to `policy.max_batch_size` rows at once.

    The first request of a batch waits at most `max_queue_delay_us` for company, and never more
    than half of its remaining deadline. Only requests with the same outputs, dtypes and
    trailing dimensions share a run.
    """

    def __init__(self, policy: BatchingPolicy, run: RunBatch):
        self.max_rows = policy.max_batch_size
        self.max_delay = policy.max_queue_delay_us / 1e6
        self.run = run
        self._queues: dict[tuple, list[_Waiting]] = {}
        self._timers: dict[tuple, asyncio.TimerHandle] = {}
        self._running: set[asyncio.Task] = set()

    async def submit(
        self, model: LoadedModel, inputs: dict[str, np.ndarray], output_names: list[str], deadline: float | None
    ) -> list:
        """The request's outputs, in `output_names` order, cut from its batch's outputs."""
        rows = {array.shape[0] for array in inputs.values()}
        if len(rows) != 1:
            raise InvalidArgument(
                f"this model batches requests, so every input needs the same first dimension; got {sorted(rows)}"
            )
        loop = asyncio.get_running_loop()
        key = (tuple(output_names), tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(inputs.items())))
        waiting = _Waiting(model, inputs, rows.pop(), deadline, loop.create_future())
        queue = self._queues.setdefault(key, [])
        queue.append(waiting)
        if sum(w.rows for w in queue if not w.reply.done()) >= self.max_rows:
            self._flush(key)
        else:
            now = loop.time()
            delay = self.max_delay if deadline is None else min(self.max_delay, max(0.0, deadline - now) / 2)
            timer = self._timers.get(key)
            if timer is None or timer.when() > now + delay:
                if timer is not None:
                    timer.cancel()
                self._timers[key] = loop.call_at(now + delay, self._flush, key)
        return await waiting.reply  # cancelling the caller cancels `reply`, and _flush skips it

    def _flush(self, key: tuple) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        queue = self._queues.pop(key, [])
        now = asyncio.get_running_loop().time()
        batch: list[_Waiting] = []
        rows = 0
        while queue and (not batch or rows + queue[0].rows <= self.max_rows):
            waiting = queue.pop(0)
            if waiting.reply.done():  # cancelled by its caller
                continue
            if waiting.deadline is not None and now >= waiting.deadline:
                waiting.reply.set_exception(DeadlineExceeded("the deadline passed before the model ran"))
                continue
            batch.append(waiting)
            rows += waiting.rows
        if queue:  # more than one batch was waiting: the rest go next, without more delay
            loop = asyncio.get_running_loop()
            self._queues[key] = queue
            self._timers[key] = loop.call_at(loop.time(), self._flush, key)
        if batch:
            task = asyncio.ensure_future(self._run_batch(batch, list(key[0]), rows))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run_batch(self, batch: list[_Waiting], output_names: list[str], rows: int) -> None:
        feeds = (
            batch[0].inputs
            if len(batch) == 1
            else {name: np.concatenate([w.inputs[name] for w in batch]) for name in batch[0].inputs}
        )
        try:
            values = await self.run(batch[0].model, feeds, output_names)
            for name, value in zip(output_names, values, strict=True):
                if not isinstance(value, np.ndarray) or value.ndim == 0 or value.shape[0] != rows:
                    raise FailedPrecondition(
                        f"output {name!r} does not keep the batch's {rows} rows as its first dimension, so "
                        "requests cannot share a run: upload the model with batching off"
                    )
        except Exception as error:
            for waiting in batch:
                if not waiting.reply.done():
                    waiting.reply.set_exception(error)
            return
        start = 0
        for waiting in batch:
            if not waiting.reply.done():
                waiting.reply.set_result([value[start : start + waiting.rows] for value in values])
            start += waiting.rows
