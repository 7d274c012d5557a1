"""Running a model: inputs checked against its signature, runs off the event loop unless known to be short."""

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from mds_grpc import metrics
from mds_grpc.core import dtypes
from mds_grpc.core.aliases import Aliases
from mds_grpc.core.batching import Batcher
from mds_grpc.core.errors import Cancelled, DeadlineExceeded, InvalidArgument, NotFound
from mds_grpc.core.model_cache import LoadedModel
from mds_grpc.core.records import ModelRecord, TensorSpec
from mds_grpc.core.registry import ModelRegistry
from mds_grpc.core.runtime import Cancellation, RunFailed


@dataclass(frozen=True)
class Prediction:
    model: str
    version: int
    # In the model's output order: numpy arrays for tensors, plain Python values otherwise.
    outputs: list[tuple[str, Any]]


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"


def check_inputs(record: ModelRecord, inputs: dict[str, np.ndarray]) -> None:
    """Raise InvalidArgument naming the first input that does not fit the model's signature."""
    if len(inputs) != len(record.inputs) or any(spec.name not in inputs for spec in record.inputs):
        label = f"model {record.name!r} version {record.version}"
        names = {spec.name for spec in record.inputs}
        unknown = [name for name in inputs if name not in names]
        if unknown:
            raise InvalidArgument(f"{label} has no input {unknown[0]!r}; its inputs are {sorted(names)}")
        missing = next(spec.name for spec in record.inputs if spec.name not in inputs)
        raise InvalidArgument(f"missing input {missing!r} for {label}")
    for spec in record.inputs:
        _check_input(spec, inputs[spec.name])


def _check_input(spec: TensorSpec, array: np.ndarray) -> None:
    dtype = dtypes.of_array(array)
    got = dtype.name if dtype else str(array.dtype)
    if spec.dtype and got != spec.dtype:
        raise InvalidArgument(f"input {spec.name!r} must have dtype {spec.dtype}, got {got}")
    wrong_rank = len(array.shape) != len(spec.shape)
    if wrong_rank or any(want >= 0 and want != have for want, have in zip(spec.shape, array.shape, strict=True)):
        raise InvalidArgument(
            f"input {spec.name!r} must have shape {_shape_text(spec.shape)}, got {_shape_text(array.shape)}"
        )


def select_outputs(record: ModelRecord, requested: Sequence[str]) -> list[str]:
    names = [spec.name for spec in record.outputs]
    unknown = [name for name in requested if name not in names]
    if unknown:
        raise InvalidArgument(
            f"model {record.name!r} version {record.version} has no output {unknown[0]!r}; its outputs are {names}"
        )
    return [name for name in names if name in requested] if requested else names


class InferenceEngine:
    """Runs models on an executor, or inline on the event loop when a model's runs are known to be short.

    A thread hop costs more than a tiny model's whole run; blocking the loop for at most
    `inline_max_seconds` (the session's estimate for the request's size) costs less.
    Models uploaded with a batching policy run their concurrent requests together, through the
    batcher of their loaded version.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        executor: Executor,
        inline_max_seconds: float = 0.0,
        aliases: Aliases | None = None,
    ):
        self.registry = registry
        self.aliases = aliases or Aliases(registry.metadata, registry, registry.resolve_ttl)
        self.executor = executor
        self.inline_max_seconds = inline_max_seconds

    async def predict(
        self,
        model: str,
        version: int,
        inputs: dict[str, np.ndarray],
        output_names: Sequence[str] = (),
        deadline: float | None = None,
        alias: str = "",
        request_id: str = "",
    ) -> Prediction:
        """Run one request on `version` (0: the latest) or through `alias` (a canary share routed by a hash of
        `request_id`). `deadline` is a time.monotonic() value after which the model is not run."""
        chosen = await self.aliases.version_for(model, version, alias, request_id)
        try:
            loaded = await self.registry.load(model, chosen)
        except NotFound:
            if not alias:
                raise
            # The alias moved on elsewhere and its old version is gone: ask the store where it points now.
            loaded = await self.registry.load(
                model, await self.aliases.version_for(model, 0, alias, request_id, reread=True)
            )
        record = loaded.record
        check_inputs(record, inputs)
        names = select_outputs(record, output_names)
        if record.batching.enabled:
            if loaded.batcher is None:
                loaded.batcher = Batcher(record.batching, partial(self._run, deadline=None))
            values = await loaded.batcher.submit(loaded, inputs, names, deadline)
        else:
            values = await self._run(loaded, inputs, names, deadline)
        return Prediction(record.name, record.version, list(zip(names, values, strict=True)))

    async def _run(
        self, loaded: LoadedModel, inputs: dict[str, np.ndarray], names: list[str], deadline: float | None
    ) -> list:
        record, session = loaded.record, loaded.session
        elements = max(1, sum(a.size for a in inputs.values()))
        on_loop = session.estimate_seconds(elements) <= self.inline_max_seconds
        cancellation = None if on_loop else Cancellation()  # a run on a thread stops when its client leaves
        submitted = time.perf_counter()

        def run() -> list:
            if cancellation is not None and cancellation.cancelled:
                raise Cancelled("the request was cancelled before the model ran")
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("the deadline passed before the model ran")
            started = time.perf_counter()
            cpu_started = 0.0 if on_loop else time.thread_time()
            try:
                values = session.run(names, inputs, cancellation)
            except RunFailed as error:
                if cancellation is not None and cancellation.cancelled:
                    raise Cancelled("the request was cancelled while the model ran") from None
                raise InvalidArgument(
                    f"onnxruntime could not run model {record.name!r} version {record.version}: {error}"
                ) from None
            computed = time.perf_counter() - started
            # On a thread, CPU time rather than wall time: that run also waits for the GIL while the
            # loop is busy, and counting the wait would keep a short model off the loop for good.
            session.observe(computed if on_loop else time.thread_time() - cpu_started, elements)
            metrics.observe_run(
                record.name,
                record.version,
                None if on_loop else started - submitted,
                computed,
                next((a.shape[0] for a in inputs.values() if a.ndim), 1),
            )
            return values

        if cancellation is None:  # on the loop
            return run()
        future = asyncio.get_running_loop().run_in_executor(self.executor, run)
        try:
            return await future
        except asyncio.CancelledError:
            cancellation.cancel()  # stops a run in progress; the client is gone
            raise
