"""Running a model: inputs checked against its signature, runs off the event loop unless known to be short."""

import asyncio
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from functools import partial
from operator import attrgetter, itemgetter
from typing import Any, NamedTuple

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

_SIZE = attrgetter("size")
INLINE_SPIKE = 4.0  # a run on the loop counts as at most this many times its estimate (see InferenceEngine._run)


class Prediction(NamedTuple):  # a NamedTuple: a frozen dataclass costs microseconds to make
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


def _fixed(spec: TensorSpec) -> tuple[Callable[[tuple], Any], Any]:
    """A function picking the dimensions the spec fixes out of a shape, and what it must pick."""
    fixed = [(axis, size) for axis, size in enumerate(spec.shape) if size >= 0]
    if not fixed:
        return (lambda shape: ()), ()
    # itemgetter of one index picks the item itself, of several a tuple
    return itemgetter(*(axis for axis, _ in fixed)), fixed[0][1] if len(fixed) == 1 else tuple(s for _, s in fixed)


class Signature:
    """A version's input and output specs, precomputed: the common request is checked without building anything,
    and one that does not plainly fit goes through check_inputs for its precise error."""

    __slots__ = ("record", "inputs", "plain", "outputs")

    def __init__(self, record: ModelRecord):
        self.record = record
        # (name, numpy dtype or None for any, rank, what picks the fixed dimensions out of a shape, their sizes)
        self.inputs = tuple(
            (spec.name, dtypes.BY_NAME[spec.dtype].numpy if spec.dtype else None, len(spec.shape), *_fixed(spec))
            for spec in record.inputs
        )
        # Comparing numpy dtypes suffices where an array of the spec's numpy dtype reads as the spec's dtype.
        self.plain = all(
            not spec.dtype or dtypes.BY_NUMPY.get(dtypes.BY_NAME[spec.dtype].numpy) is dtypes.BY_NAME[spec.dtype]
            for spec in record.inputs
        )
        self.outputs = [spec.name for spec in record.outputs]

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        """Raise InvalidArgument naming the first input that does not fit (see check_inputs)."""
        if self.plain and len(inputs) == len(self.inputs):
            for name, dtype, rank, pick, sizes in self.inputs:
                array = inputs.get(name)
                if array is None or (dtype is not None and array.dtype != dtype) or array.ndim != rank:
                    break
                if pick(array.shape) != sizes:
                    break
            else:
                return
        check_inputs(self.record, inputs)

    def select(self, requested: Sequence[str]) -> list[str]:
        """The outputs to run, in the model's order (see select_outputs); the list is shared: do not change it."""
        return select_outputs(self.record, requested) if requested else self.outputs


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
        # Each loaded version's signature, for as long as the version stays loaded.
        self._signatures: weakref.WeakKeyDictionary[LoadedModel, Signature] = weakref.WeakKeyDictionary()

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
        chosen = await self.aliases.version_for(model, version, alias, request_id) if alias else version
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
        signature = self._signatures.get(loaded)
        if signature is None:
            signature = self._signatures[loaded] = Signature(record)
        signature.check(inputs)
        names = signature.select(output_names)
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
        elements = max(1, sum(map(_SIZE, inputs.values())))
        estimate = loaded.session.estimate_seconds(elements)
        if estimate <= self.inline_max_seconds:
            return self._run_now(loaded, inputs, names, deadline, elements, estimate)
        cancellation = Cancellation()  # a run on a thread stops when its client leaves
        future = asyncio.get_running_loop().run_in_executor(
            self.executor,
            partial(self._run_now, cancellation=cancellation, submitted=time.perf_counter()),
            loaded,
            inputs,
            names,
            deadline,
            elements,
            estimate,
        )
        try:
            return await future
        except asyncio.CancelledError:
            cancellation.cancel()  # stops a run in progress; the client is gone
            raise

    @staticmethod
    def _run_now(
        loaded: LoadedModel,
        inputs: dict[str, np.ndarray],
        names: list[str],
        deadline: float | None,
        elements: int,
        estimate: float,
        cancellation: Cancellation | None = None,
        submitted: float = 0.0,
    ) -> list:
        """The run itself: on the event loop, or (with a `cancellation`) on an inference thread since `submitted`."""
        record, session, on_loop = loaded.record, loaded.session, cancellation is None
        if cancellation is not None and cancellation.cancelled:
            raise Cancelled("the request was cancelled before the model ran")
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("the deadline passed before the model ran")
        started = time.perf_counter()
        # CPU time, not wall time, is what a CPU run costs wherever it runs (a system call of about 0.4 µs)
        by_cpu = not on_loop or session.device is None
        cpu_started = time.thread_time() if by_cpu else 0.0
        try:
            values = session.run(names, inputs, cancellation)
        except RunFailed as error:
            if cancellation is not None and cancellation.cancelled:
                raise Cancelled("the request was cancelled while the model ran") from None
            raise InvalidArgument(
                f"onnxruntime could not run model {record.name!r} version {record.version}: {error}"
            ) from None
        computed = time.perf_counter() - started
        # CPU time rather than wall time: a run on a thread also waits for the GIL while the loop is busy,
        # and one on the loop for the cores a loaded machine shares out; counting those waits moved short
        # models off the loop, where each run then cost a thread hand-off several times the run itself. A run
        # on a GPU waits for the device without using the CPU: on the loop it counts its wall time, at most
        # INLINE_SPIKE times the estimate, so that one stall moves the estimate up by little.
        session.observe(
            time.thread_time() - cpu_started if by_cpu else min(computed, INLINE_SPIKE * estimate), elements
        )
        rows = 1
        for array in inputs.values():
            if array.ndim:
                rows = array.shape[0]
                break
        metrics.observe_run(record.name, record.version, None if on_loop else started - submitted, computed, rows)
        return values
