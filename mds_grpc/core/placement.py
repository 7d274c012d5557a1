"""Where model versions run: onnxruntime execution providers by short name, and the checks on a placement."""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mds_grpc.core.errors import FailedPrecondition, InvalidArgument
from mds_grpc.core.records import Placement

PROVIDERS = ("tensorrt", "cuda", "cpu")  # every provider a version can be placed on
GPU_PROVIDERS = frozenset({"tensorrt", "cuda"})


def check_names(names: Sequence[str]) -> None:
    """Raise InvalidArgument for an unknown or repeated provider name."""
    unknown = [name for name in names if name not in PROVIDERS]
    if unknown:
        raise InvalidArgument(f"unknown execution provider {unknown[0]!r}; MDS knows {', '.join(PROVIDERS)}")
    if len(set(names)) != len(names):
        raise InvalidArgument(f"execution providers must not repeat; got {', '.join(names)}")


def parse_providers(text: str) -> tuple[str, ...]:
    """A comma-separated provider list (MDS_EXECUTION_PROVIDERS), checked; never empty."""
    names = tuple(name.strip().lower() for name in text.split(",") if name.strip())
    if not names:
        raise InvalidArgument("the execution provider list is empty; use e.g. cpu or cuda,cpu")
    check_names(names)
    return names


@dataclass(frozen=True)
class SessionTarget:
    """Where one session runs: providers by short name, preferred first, with their GPU settings."""

    providers: tuple[str, ...] = ("cpu",)
    device_id: int = 0
    device_memory_bytes: int = 0  # the CUDA arena's limit and TensorRT's workspace; 0: onnxruntime's default
    tensorrt_fp16: bool = False
    engine_cache: Path | None = None  # where TensorRT keeps built engines; None builds them per session


@dataclass(frozen=True)
class Placer:
    """This server's execution providers and GPU budgets: where each version's sessions run."""

    providers: tuple[str, ...] = ("cpu",)  # MDS_EXECUTION_PROVIDERS, for versions without their own list
    available: tuple[str, ...] = ("cpu",)  # what this onnxruntime build has
    device_budget_bytes: int = 0  # MDS_GPU_MEMORY_BYTES
    session_memory_bytes: int = 0  # MDS_GPU_SESSION_MEMORY_BYTES
    engine_root: Path | None = None  # TensorRT engines, a folder per model version

    def check(self, placement: Placement) -> None:
        """At upload: every provider named exists on this server, and the session fits a GPU's budget."""
        check_names(placement.providers)
        missing = [name for name in placement.providers if name not in self.available]
        if missing:
            raise FailedPrecondition(
                f"this server has no {', '.join(missing)} execution provider; it has {', '.join(self.available)} "
                "(GPUs need onnxruntime-gpu on a CUDA machine, see docs/gpu.md)"
            )
        if placement.device_memory_bytes > self.device_budget_bytes:
            raise FailedPrecondition(
                f"device_memory_bytes {placement.device_memory_bytes} exceeds the device memory this server "
                f"gives models on one GPU (MDS_GPU_MEMORY_BYTES={self.device_budget_bytes})"
            )

    def resolve(self, placement: Placement) -> tuple[str, ...]:
        """The providers a version's session asks for here, preferred first: its own list (or the server's)
        less the ones this server lacks."""
        return tuple(name for name in placement.providers or self.providers if name in self.available)

    def on_gpu(self, placement: Placement) -> bool:
        """Whether the version's sessions here ask for a GPU first."""
        providers = self.resolve(placement)
        return bool(providers) and providers[0] in GPU_PROVIDERS

    def engine_folder(self, name: str, version: int) -> Path | None:
        return None if self.engine_root is None else self.engine_root / name / str(version)

    def target(self, name: str, version: int, placement: Placement) -> SessionTarget:
        """The session target of a version here; FailedPrecondition when this server lacks all its providers."""
        providers = self.resolve(placement)
        if not providers:
            wanted = placement.providers or self.providers
            raise FailedPrecondition(
                f"model {name!r} version {version} runs on {', '.join(wanted)}, and this server has only "
                f"{', '.join(self.available)}; serve it from a server with that provider, or upload it again "
                "with a placement this server has"
            )
        memory = placement.device_memory_bytes or self.session_memory_bytes
        folder = self.engine_folder(name, version)
        settings = f"device{placement.device_id}-{'fp16' if placement.tensorrt_fp16 else 'fp32'}-{memory}"
        return SessionTarget(
            providers=providers,
            device_id=placement.device_id,
            device_memory_bytes=memory,
            tensorrt_fp16=placement.tensorrt_fp16,
            engine_cache=None if folder is None else folder / settings,
        )
