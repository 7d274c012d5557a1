"""Checking an uploaded model in a helper process when that would take much memory in the serving process.

onnxruntime holds a model whose weights are inside its .onnx file whole in memory while loading it, about
three times the file. A helper process, spawned for one check and ended after it, gives that memory back.
"""

import asyncio
import ctypes
import logging
import multiprocessing
import resource
import signal
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mds_grpc.core.errors import MdsError, ResourceExhausted
from mds_grpc.core.runtime import OnnxSession
from mds_grpc.core.to_the_end import to_the_end

if TYPE_CHECKING:
    from mds_grpc.core.inspection import ModelInfo

log = logging.getLogger("mds.validation")

PR_SET_PDEATHSIG = 1  # prctl: the signal a process gets when its parent dies
IN_PROCESS_MAX_BYTES = 16 << 20  # checking costs about 3x the .onnx file: at most ~48 MiB in the serving process


class HelperFailed(Exception):
    """A helper's function raised something other than an MdsError; the message is its traceback."""


class Validator:
    """Runs inspect_model: in a thread for a small .onnx file, in a spawned helper process for a bigger one.

    At most `processes` helpers run at once; further checks wait their turn.
    """

    def __init__(self, processes: int = 1, in_process_max_bytes: int = IN_PROCESS_MAX_BYTES, intra_op_threads=0):
        self.in_process_max_bytes = in_process_max_bytes
        self.intra_op_threads = intra_op_threads
        self._slots = asyncio.Semaphore(processes)
        self._context = multiprocessing.get_context("spawn")

    async def inspect(self, path: Path, side_files: set[str], serve: bool) -> tuple[OnnxSession | None, "ModelInfo"]:
        """As inspect_model; a model checked in a helper comes without a session (it loads on first use)."""
        if path.stat().st_size <= self.in_process_max_bytes:
            return await asyncio.to_thread(_inspect, path, side_files, self.intra_op_threads, serve)
        return None, await self.run(_check, path, side_files, self.intra_op_threads)

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """function(*args) in a new spawned process; its MdsError is raised here.

        A cancellation kills the helper. A helper that dies raises ResourceExhausted when killed by SIGKILL
        (the out-of-memory killer's signal), MdsError (INTERNAL) otherwise.
        """
        async with self._slots:
            receiver, sender = self._context.Pipe(duplex=False)
            helper = self._context.Process(target=_serve, args=(sender, function, args), daemon=True)
            try:
                helper.start()
            except BaseException:
                receiver.close()
                raise
            finally:
                sender.close()
            log.info("helper process started", extra={"pid": helper.pid, "function": function.__name__})
            started = time.monotonic()
            reading = asyncio.ensure_future(asyncio.to_thread(_receive, receiver))
            try:
                await asyncio.shield(reading)
            finally:
                if not reading.done():
                    helper.kill()  # cancelled: the reader sees the pipe close once the helper is gone
                await to_the_end(_reap(reading, helper, receiver, function.__name__, started))
        outcome = reading.result()
        if outcome is None:
            raise _death(helper.exitcode)
        result, _ = outcome
        if isinstance(result, BaseException):
            raise result
        return result


async def _reap(reading: asyncio.Future, helper, receiver: Connection, function: str, started: float) -> None:
    """Wait for the reader (it returns once the helper sent its result or died) and the helper; close the pipe."""
    await asyncio.wait([reading])
    await asyncio.to_thread(helper.join)
    receiver.close()
    outcome = None if reading.cancelled() or reading.exception() else reading.result()
    log.info(
        "helper process ended",
        extra={
            "pid": helper.pid,
            "function": function,
            "exit_code": helper.exitcode,
            "seconds": round(time.monotonic() - started, 3),
            "peak_rss_mib": None if outcome is None else round(outcome[1] / 1024, 1),
        },
    )


def _receive(receiver: Connection):
    """The helper's (result, peak RSS KiB), or None when it died without sending them."""
    try:
        return receiver.recv()
    except EOFError:
        return None


def _death(exit_code: int | None) -> MdsError:
    if exit_code == -signal.SIGKILL:
        return ResourceExhausted(
            "the helper process checking the model was killed (SIGKILL), most likely by the out-of-memory killer: "
            "checking a model whose weights are inside its .onnx file takes about three times the file in memory. "
            "Give the server more memory, lower MDS_VALIDATION_PROCESSES, or keep the weights in external data"
        )
    how = f"signal {signal.Signals(-exit_code).name}" if exit_code and exit_code < 0 else f"exit code {exit_code}"
    return MdsError(f"the helper process checking the model died ({how}) before answering; the server log has details")


def _serve(sender: Connection, function: Callable[..., Any], args: tuple) -> None:
    """In the helper: run function(*args) and send (its result or error, this process's peak RSS in KiB)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # ends with the serving process
    result: Any
    try:
        result = function(*args)
    except MdsError as error:
        result = error
    except MemoryError:
        result = ResourceExhausted("the helper process checking the model ran out of memory")
    except Exception:  # a bug: the serving process logs it as an internal error
        result = HelperFailed(traceback.format_exc())
    sender.send((result, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    sender.close()


def _inspect(path: Path, side_files: set[str], intra_op_threads: int, serve: bool) -> tuple[OnnxSession, "ModelInfo"]:
    """inspect_model, imported on the first check: it needs the onnx package (about 0.2 s to import), which
    serving alone does not, so a server starts without it."""
    from mds_grpc.core.inspection import inspect_model

    return inspect_model(path, side_files, intra_op_threads, serve)


def _check(path: Path, side_files: set[str], intra_op_threads: int) -> "ModelInfo":
    return _inspect(path, side_files, intra_op_threads, serve=False)[1]
