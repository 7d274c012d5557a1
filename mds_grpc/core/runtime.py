"""onnxruntime behind one class: every session MDS opens, inspects and runs is an OnnxSession.

Nothing else imports onnxruntime. Types numpy knows only through ml_dtypes (BF16 and the like,
`DType.extension`) cross into and out of onnxruntime as OrtValues; the rest go through numpy.
"""

import ctypes
import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mds_grpc.core import dtypes
from mds_grpc.core.errors import FailedPrecondition, Unimplemented
from mds_grpc.core.placement import GPU_PROVIDERS, SessionTarget
from mds_grpc.core.records import TensorSpec

ort.set_default_logger_severity(3)  # errors only; warnings about unused initializers are noise
log = logging.getLogger("mds.runtime")

ORT_NAMES = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
SHORT_NAMES = {ort_name: name for name, ort_name in ORT_NAMES.items()}


def runtime_version() -> str:
    return ort.__version__


def save_prepacked(source: Path, model: Path, data_file: str) -> None:
    """Save the model at `source` as onnxruntime optimizes it for this CPU, its weights prepacked for its
    kernels, into `model` and its external-data file `data_file` next to it: a session loading that file maps
    the prepacked weights instead of packing them into memory of its own."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_cpu_mem_arena = False
    options.optimized_model_filepath = str(model)
    options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_file)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def available_providers() -> tuple[str, ...]:
    """The execution providers this onnxruntime build has, by short name, GPUs first."""
    have = set(ort.get_available_providers())
    return tuple(name for name, ort_name in ORT_NAMES.items() if ort_name in have)


@functools.cache
def _load_gpu_libraries() -> None:
    """Load CUDA and cuDNN from their PyPI packages (installed with onnxruntime-gpu's cuda and cudnn extras)."""
    ort.preload_dlls()


def _provider_options(name: str, target: SessionTarget) -> tuple[str, dict]:
    limit = str(target.device_memory_bytes)
    if name == "cuda":  # an arena that grows only by what is asked, up to its limit
        options = {"device_id": target.device_id, "gpu_mem_limit": limit, "arena_extend_strategy": "kSameAsRequested"}
    elif name == "tensorrt":
        options = {
            "device_id": target.device_id,
            "trt_max_workspace_size": limit,
            "trt_fp16_enable": target.tensorrt_fp16,
        }
        if target.engine_cache is not None:
            target.engine_cache.mkdir(parents=True, exist_ok=True)
            options |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(target.engine_cache)}
            options |= {"trt_timing_cache_enable": True, "trt_timing_cache_path": str(target.engine_cache)}
    else:
        options = {}
    return ORT_NAMES[name], options


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
    """One onnxruntime session, loaded by path (so external data resolves next to the file).

    No custom-op library is ever registered. No CPU memory arena either: after a run fails to allocate a
    huge tensor, onnxruntime's arena makes the next run touch hundreds of MB, and it never gives memory back.
    A `lean` session does not prepack weights: external data then stays memory-mapped from its files, read
    on use and shared through the page cache with every process mapping the same files, where prepacking
    copies every weight into memory of the session's own (faster runs of many rows, a slower load).
    On a GPU (`target`), runs bind their outputs to host memory, so each output is copied once.
    """

    def __init__(
        self,
        path: Path,
        intra_op_threads: int = 0,
        lean: bool = False,
        target: SessionTarget | None = None,
    ):
        self.target = target or SessionTarget()
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.enable_cpu_mem_arena = False
        if lean:
            options.add_session_config_entry("session.disable_prepacking", "1")
        self._session = self._open(path, options)
        # The providers it runs on, by short name, preferred first; and the GPU it holds memory on (None: CPU).
        self.providers = tuple(SHORT_NAMES.get(name, name) for name in self._session.get_providers())
        self.device = self.target.device_id if self.providers[0] in GPU_PROVIDERS else None
        self.inputs = tuple(_spec(a) for a in self._session.get_inputs())
        self.outputs = tuple(_spec(a) for a in self._session.get_outputs())
        self._extension_outputs = {
            s.name: dtypes.BY_NAME[s.dtype].numpy for s in self.outputs if s.dtype and dtypes.BY_NAME[s.dtype].extension
        }
        self._bindable = all(spec.dtype != "STRING" for spec in self.inputs + self.outputs)
        # Moving average of run time per input element: the estimate of a run's cost.
        self._seconds_per_element: float | None = None

    def _open(self, path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
        """A session on the first provider of the target that can run the model; the log names each fallback."""
        providers = list(self.target.providers)
        while True:
            name = providers[0]
            try:
                if ORT_NAMES[name] not in ort.get_available_providers():
                    raise RunFailed(f"this onnxruntime has no {name} provider")
                if name in GPU_PROVIDERS:
                    _load_gpu_libraries()
                session = ort.InferenceSession(
                    str(path),
                    options,
                    providers=[_provider_options(p, self.target) for p in providers],
                    enable_fallback=0,
                )
                active = SHORT_NAMES.get(session.get_providers()[0])
                if active != name:
                    raise RunFailed(f"onnxruntime could not start {name}, see its log, and put the model on {active}")
                return session
            except Exception as error:  # onnxruntime raises its own exception types
                if name not in GPU_PROVIDERS:
                    raise
                if len(providers) == 1:
                    raise FailedPrecondition(
                        f"{name} cannot run the model ({str(error)[:500]}), and its placement "
                        f"({', '.join(self.target.providers)}) allows no other provider"
                    ) from None
                log.warning("%s: %s cannot run the model (%s); trying %s", path, name, error, providers[1])
                providers.pop(0)

    @property
    def intra_op_threads(self) -> int:
        return self._session.get_session_options().intra_op_num_threads

    def run(
        self, output_names: Sequence[str], feeds: dict[str, np.ndarray], cancellation: Cancellation | None = None
    ) -> list:
        """The outputs named, in that order; raise RunFailed with onnxruntime's reason."""
        options = None if cancellation is None else cancellation.options
        extensions = set()  # DType.extension: none for most models, found without building anything
        if self._extension_outputs:
            extensions = {self._extension_outputs[n] for n in output_names if n in self._extension_outputs}
        for array in feeds.values():
            if array.dtype.kind == "V":
                extensions.add(array.dtype)
        try:
            if not extensions:
                if self.device is not None and self._bindable:
                    return self._run_bound(output_names, feeds, options)
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

    def _run_bound(self, output_names: Sequence[str], feeds: dict[str, np.ndarray], options) -> list:
        """A run whose outputs land in host memory that the returned arrays view (no second copy)."""
        binding = self._session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name in output_names:
            binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding, options)
        return [value.numpy() for value in binding.get_outputs()]

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
