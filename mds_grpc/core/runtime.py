"""onnxruntime behind one class: every session MDS opens, inspects and runs is an OnnxSession.

Nothing else imports onnxruntime. Types numpy knows only through ml_dtypes (BF16 and the like,
`DType.extension`) cross into and out of onnxruntime as OrtValues; the rest go through numpy.
"""

import ctypes
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mds_grpc.core import dtypes
from mds_grpc.core.errors import Unimplemented
from mds_grpc.core.records import TensorSpec

ort.set_default_logger_severity(3)  # errors only; warnings about unused initializers are noise

PROVIDERS = ["CPUExecutionProvider"]


class RunFailed(Exception):
    """onnxruntime refused or failed a run; the message is its reason."""


class Cancellation:
    """Stops a run in progress from another thread (the client left)."""

    def __init__(self) -> None:
        self.options = ort.RunOptions()

    def cancel(self) -> None:
        self.options.terminate = True

    @property
    def cancelled(self) -> bool:
        return self.options.terminate


def _spec(arg) -> TensorSpec:
    dtype = dtypes.of_onnx_type(arg.type)
    dims = list(arg.shape or []) if dtype else []
    return TensorSpec(
        name=arg.name,
        dtype=dtype.name if dtype else None,
        shape=tuple(d if isinstance(d, int) and d >= 0 else -1 for d in dims),
        onnx_type=arg.type,
        dim_names=tuple(d if isinstance(d, str) else "" for d in dims),
    )


def _to_ort_value(array: np.ndarray) -> ort.OrtValue:
    dtype = dtypes.of_array(array)
    if dtype is not None and dtype.extension:
        bits = np.dtype(f"<u{dtype.numpy.itemsize}")
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(bits), dtype.onnx_enum)
    return ort.OrtValue.ortvalue_from_numpy(array)


def _from_ort_value(value: ort.OrtValue) -> np.ndarray:
    dtype = dtypes.of_onnx_type(value.data_type())
    if dtype is not None and dtype.extension:
        raw = (ctypes.c_char * value.tensor_size_in_bytes()).from_address(value.data_ptr())
        return np.frombuffer(bytes(raw), dtype=dtype.numpy).reshape(value.shape())
    return value.numpy()


class OnnxSession:
    """One onnxruntime CPU session, loaded by path (so external data resolves next to the file).

    No custom-op library is ever registered. No memory arena either: after a run fails to allocate a
    huge tensor, onnxruntime's arena makes the next run touch hundreds of MB, and it never gives memory back.
    A `lean` session, for checking a model only, does not prepack weights: external data then stays
    memory-mapped and untouched, where prepacking would copy every weight (slower runs without it).
    """

    def __init__(self, path: Path, intra_op_threads: int = 0, lean: bool = False):
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.enable_cpu_mem_arena = False
        if lean:
            options.add_session_config_entry("session.disable_prepacking", "1")
        self._session = ort.InferenceSession(str(path), options, providers=PROVIDERS)
        self.inputs = tuple(_spec(a) for a in self._session.get_inputs())
        self.outputs = tuple(_spec(a) for a in self._session.get_outputs())
        self._extension_outputs = {
            s.name: dtypes.BY_NAME[s.dtype].numpy for s in self.outputs if s.dtype and dtypes.BY_NAME[s.dtype].extension
        }
        # Moving average of run time per input element: the estimate of a run's cost.
        self._seconds_per_element: float | None = None

    @property
    def intra_op_threads(self) -> int:
        return self._session.get_session_options().intra_op_num_threads

    def run(
        self, output_names: Sequence[str], feeds: dict[str, np.ndarray], cancellation: Cancellation | None = None
    ) -> list:
        """The outputs named, in that order; raise RunFailed with onnxruntime's reason."""
        options = None if cancellation is None else cancellation.options
        extensions = {self._extension_outputs[n] for n in output_names if n in self._extension_outputs} | {
            a.dtype for a in feeds.values() if a.dtype.kind == "V"
        }  # DType.extension
        try:
            if not extensions:
                return self._session.run(list(output_names), feeds, options)
            # numpy-facing run() cannot carry extension types: they cross as OrtValues
            if any(a.dtype == object for a in feeds.values()):
                names = "/".join(sorted(dtypes.BY_NUMPY[d].name for d in extensions))
                raise Unimplemented(
                    f"onnxruntime's Python API cannot run a model with both STRING inputs and {names} tensors"
                )
            values = {name: _to_ort_value(array) for name, array in feeds.items()}
            return [_from_ort_value(v) for v in self._session.run_with_ort_values(list(output_names), values, options)]
        except Unimplemented:
            raise
        except Exception as error:  # onnxruntime raises its own exception types
            raise RunFailed(str(error)) from None

    def warm_up(self) -> None:
        """One run on zeros shaped like the inputs (symbolic dimensions as 1), so the first request pays no
        lazy initialisation; nothing when an input is not a tensor."""
        feeds = {}
        for spec in self.inputs:
            if spec.dtype is None:
                return
            shape, dtype = tuple(max(d, 1) for d in spec.shape), dtypes.BY_NAME[spec.dtype].numpy
            feeds[spec.name] = np.full(shape, "" if spec.dtype == "STRING" else 0, dtype)
        self.run([spec.name for spec in self.outputs], feeds)

    def estimate_seconds(self, elements: int) -> float:
        """A run's expected time for this many input elements (infinite until one run was timed)."""
        return float("inf") if self._seconds_per_element is None else self._seconds_per_element * elements

    def observe(self, seconds: float, elements: int) -> None:
        per_element = seconds / max(1, elements)
        previous = self._seconds_per_element
        self._seconds_per_element = per_element if previous is None else 0.8 * previous + 0.2 * per_element
