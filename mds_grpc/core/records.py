"""What MDS knows about a stored model version, and its plain-dict form for metadata stores."""

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime

MAIN_FILE = "model.onnx"


def utc_now() -> datetime:
    """The current UTC time at the precision every store keeps (MongoDB: milliseconds)."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str | None  # a core DType name; None for non-tensor values
    shape: tuple[int, ...]  # -1 for a symbolic or unknown dimension
    onnx_type: str
    dim_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class StoredFile:
    path: str  # relative to the model's folder; MAIN_FILE for the graph
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class BatchingPolicy:
    """Dynamic batching of one model version; off unless max_batch_size is at least 2."""

    max_batch_size: int = 0  # rows along the first dimension per onnxruntime run
    max_queue_delay_us: int = 0  # how long a batch's first request waits for others

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1


@dataclass(frozen=True)
class Placement:
    """Where one model version runs (core/placement.py); the defaults follow the server's settings."""

    providers: tuple[str, ...] = ()  # execution providers by short name, preferred first; () = the server's list
    device_id: int = 0  # the GPU of the cuda and tensorrt providers
    tensorrt_fp16: bool = False  # TensorRT may build FP16 kernels
    device_memory_bytes: int = 0  # the session's device memory limit; 0 = MDS_GPU_SESSION_MEMORY_BYTES


@dataclass(frozen=True)
class ModelRecord:
    name: str
    version: int  # 0 until the metadata store allocates one
    created_at: datetime
    files: tuple[StoredFile, ...]  # the main file first
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opsets: tuple[tuple[str, int], ...] = ()
    producer_name: str = ""
    producer_version: str = ""
    ir_version: int = 0
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    batching: BatchingPolicy = BatchingPolicy()
    placement: Placement = Placement()

    @property
    def sha256(self) -> str:
        return self.files[0].sha256

    @property
    def size_bytes(self) -> int:
        return self.files[0].size_bytes

    @property
    def total_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)


def record_to_dict(record: ModelRecord) -> dict:
    """A JSON- and BSON-friendly dict, without nested arrays (created_at stays a datetime)."""
    data = dataclasses.asdict(record)
    data["opsets"] = [{"domain": domain, "version": version} for domain, version in record.opsets]
    if record.placement == Placement():
        del data["placement"]  # stored only when set, so servers that predate it still read the record
    return data


def record_from_dict(data: dict) -> ModelRecord:
    def spec(d: dict) -> TensorSpec:
        return TensorSpec(d["name"], d["dtype"], tuple(d["shape"]), d["onnx_type"], tuple(d["dim_names"]))

    return ModelRecord(
        **{
            **data,
            "files": tuple(StoredFile(**f) for f in data["files"]),
            "inputs": tuple(spec(s) for s in data["inputs"]),
            "outputs": tuple(spec(s) for s in data["outputs"]),
            "opsets": tuple((o["domain"], o["version"]) for o in data["opsets"]),
            "batching": BatchingPolicy(**data.get("batching", {})),  # absent from records stored before it
            "placement": _placement(data.get("placement")),
        }
    )


def _placement(data: dict | None) -> Placement:
    return Placement() if data is None else Placement(**{**data, "providers": tuple(data["providers"])})
