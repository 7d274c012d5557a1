"""Settings from MDS_* environment variables (and a .env file), overridable by CLI flags.

Each setting's name, default and meaning are declared here, once; `make settings-docs` writes
`.env.example` and `docs/configuration.md` from them.
"""

import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TypeVar

from dotenv import dotenv_values, find_dotenv

GiB = 1 << 30
MiB = 1 << 20
T = TypeVar("T")
log = logging.getLogger("mds.config")


@dataclass(frozen=True)
class Group:
    """A topic the settings reference lists its settings under."""

    title: str
    intro: str


SERVER = Group("Server", "Where `mds serve` listens, how many serving processes share the port, logs and metrics.")
AUTH = Group("Auth and TLS", "API keys are managed with `mds keys create|list|revoke`.")
STORAGE = Group(
    "Storage",
    "Empty MongoDB and S3 settings mean the embedded default: SQLite and a local folder in "
    "MDS_DATA_DIR. `make services` prints the values for local MinIO, FerretDB and Redis.",
)
LIMITS = Group(
    "Limits",
    "Past a limit a request fails with RESOURCE_EXHAUSTED; per-request limits are checked "
    "before anything is allocated.",
)
INFERENCE = Group("Inference", "How models are loaded and run.")
GPUS = Group(
    "GPUs",
    "Where models run. GPUs need onnxruntime-gpu (`MDS_GPU=1 make run`) on a CUDA machine; see docs/gpu.md. "
    "A version can ask for its own providers at upload (ModelHeader.placement).",
)
JOBS = Group(
    "Jobs",
    "Bulk jobs run in `mds serve` itself or, with MDS_REDIS_URL, in `mds worker` processes "
    "(any number, on any machine with the same settings).",
)


def setting(default: T, doc: str, group: Group, shown: str = "") -> T:
    """A Settings field with its one-line meaning; `shown` describes a default that depends on the machine."""
    return field(default=default, metadata={"doc": doc, "group": group, "shown": shown})


@dataclass(frozen=True)
class Settings:
    """Each field `x` is read from `MDS_X`."""

    grpc_host: str = setting(
        "127.0.0.1", "Address the gRPC server listens on: 127.0.0.1 keeps it local, 0.0.0.0 exposes it.", SERVER
    )
    grpc_port: int = setting(50051, "Port of the gRPC server (mds.v1, V2, health, reflection).", SERVER)
    websocket_port: int = setting(
        50052,
        "Port on MDS_GRPC_HOST of PredictStream over WebSocket (/v1/predictions:ws, see docs/websocket.md), "
        "shared by serving processes like the gRPC port; 0 turns it off.",
        SERVER,
    )
    processes: int = setting(
        1,
        "Serving processes sharing the port (SO_REUSEPORT), each with its own models "
        "loaded; process i logs to MDS_LOG_DIR/mds-i.log, with metrics on MDS_METRICS_PORT + i.",
        SERVER,
    )
    log_dir: Path = setting(
        Path("logs"), "JSON log lines go to stdout and to MDS_LOG_DIR/mds.log (rotated at 50 MiB, 5 kept).", SERVER
    )
    log_level: str = setting("INFO", "Log level: DEBUG, INFO, WARNING or ERROR.", SERVER)
    metrics_port: int = setting(0, "Prometheus /metrics on MDS_GRPC_HOST at this port; 0 turns it off.", SERVER)
    drain_seconds: float = setting(
        5.0,
        "On SIGTERM: health turns NOT_SERVING at once, and the server keeps serving this many seconds so that "
        "balancers stop sending before it stops accepting (SIGINT skips it).",
        SERVER,
    )
    shutdown_grace_seconds: float = setting(
        10.0,
        "After the drain (or on SIGINT): stop accepting, let in-flight RPCs and streams finish for this many "
        "seconds, exit 0.",
        SERVER,
    )
    backend_check_seconds: float = setting(2.0, "How often health re-checks the backends, in seconds.", SERVER)

    auth: str = setting("auto", "API keys: on, off, or auto (on whenever MDS_MONGO_URI is set).", AUTH)
    auth_cache_seconds: float = setting(
        5.0, "Seconds a key is trusted before it is read again: a revocation takes effect within it.", AUTH
    )
    auth_open_probes: bool = setting(
        True,
        "Health, reflection and V2 live/ready/metadata answer without a key; false: they need a valid key too.",
        AUTH,
    )
    tls_cert_file: str = setting("", "PEM certificate for TLS on the gRPC port; empty serves plaintext.", AUTH)
    tls_key_file: str = setting("", "PEM private key of the TLS certificate.", AUTH)
    tls_client_ca_file: str = setting(
        "", "PEM CA certificate; when set, clients must present a certificate it signed (mutual TLS).", AUTH
    )

    data_dir: Path = setting(
        Path("data"),
        "Embedded storage: blobs in MDS_DATA_DIR/blobs, metadata in "
        "MDS_DATA_DIR/mds.sqlite3, model folders in MDS_DATA_DIR/models, uploads in progress "
        "in MDS_DATA_DIR/tmp.",
        STORAGE,
    )
    mongo_uri: str = setting("", "MongoDB for metadata, keys and jobs; empty: SQLite in MDS_DATA_DIR.", STORAGE)
    mongo_database: str = setting("mds", "Database to use on MongoDB.", STORAGE)
    s3_endpoint: str = setting(
        "", "S3 or MinIO endpoint (host:port) for model files; empty: a local folder in MDS_DATA_DIR.", STORAGE
    )
    s3_access_key: str = setting("", "S3 access key.", STORAGE)
    s3_secret_key: str = setting("", "S3 secret key.", STORAGE)
    s3_bucket: str = setting("mds-models", "Bucket for model files; created if missing.", STORAGE)
    s3_secure: bool = setting(False, "Talk to S3 over HTTPS.", STORAGE)
    s3_region: str = setting("", "S3 region; empty lets the client find it.", STORAGE)

    max_model_bytes: int = setting(
        4 * GiB,
        "Largest upload (main file plus external-data side files), in bytes; an upload fails as soon as it crosses it.",
        LIMITS,
    )
    max_model_files: int = setting(
        1000, "External-data side files one model upload may hold (besides its .onnx file); 0 allows none.", LIMITS
    )
    max_message_bytes: int = setting(64 * MiB, "Largest gRPC message in either direction, in bytes.", LIMITS)
    grpc_stream_window_bytes: int = setting(
        4 * MiB,
        "Flow-control window per gRPC stream, in bytes: how much of an upload the server takes ahead of its "
        "handler, and so holds. It caps one stream at this much per round trip (4 MiB at 100 ms: 40 MiB/s); "
        "0 lets gRPC size it from the measured bandwidth-delay product, faster over high-latency links, but "
        "then a fast sender such as Envoy makes the server hold more (its RSS grew by up to 181 MiB during a "
        "1 GiB upload through Envoy, against 20 to 30 MiB at 4 MiB; see docs/rest.md#memory).",
        LIMITS,
    )
    stream_max_in_flight: int = setting(8, "Requests of one PredictStream worked on at once.", LIMITS)
    max_inputs: int = setting(64, "Input tensors per request.", LIMITS)
    max_rank: int = setting(16, "Dimensions per tensor.", LIMITS)
    max_elements: int = setting(
        1 << 28, "Elements per request (all tensors together), and the largest dimension.", LIMITS
    )
    max_string_bytes: int = setting(1 * MiB, "Bytes per STRING element.", LIMITS)

    model_cache_bytes: int = setting(
        2 * GiB,
        "Loaded onnxruntime sessions are kept in an LRU bounded by the sum of their model file sizes, in bytes.",
        INFERENCE,
    )
    preload_models: bool = setting(
        True,
        "`mds serve` records the versions loaded, most recently used first, in MDS_DATA_DIR/loaded-models.json "
        "(loaded-models-i.json for serving process i); at start it serves at once and loads them again in the "
        "background, in that order, up to MDS_MODEL_CACHE_BYTES. false: nothing is recorded, and each version "
        "loads on its first request.",
        INFERENCE,
    )
    inference_threads: int = setting(
        os.cpu_count() or 2, "Threads that run onnxruntime.", INFERENCE, shown="the number of CPUs"
    )
    ort_intra_op_threads: int = setting(
        0, "onnxruntime's intra-op threads per session; 0 lets onnxruntime decide.", INFERENCE
    )
    shared_weights_min_bytes: int = setting(
        64 * MiB,
        "A version whose external-data files add up to at least this many bytes, uploaded without a batching "
        "policy, first runs with its weights memory-mapped from those files instead of prepacked into memory of "
        "its own: it loads in moments, and every serving process of the host (`--processes`) shares one copy "
        "through the page cache. Prepacked weights run requests of many rows faster (about 2-3x at 8 rows): "
        "see MDS_PREPACKED_COPIES, which applies to every CPU version of at least this many bytes.",
        INFERENCE,
    )
    prepacked_copies: bool = setting(
        True,
        "A CPU version of at least MDS_SHARED_WEIGHTS_MIN_BYTES (its files together, weights inside the .onnx "
        "file or not) switches, once loaded, to the host's prepacked copy in MDS_DATA_DIR/prepacked: its weights "
        "laid out for onnxruntime's kernels and memory-mapped, so runs of many rows are fast and every serving "
        "process shares one copy. A helper process (see MDS_VALIDATION_PROCESSES) makes the copy once per host, "
        "onnxruntime version and CPU; it takes about twice the weights on disk and goes once no loaded version "
        "uses it. false: no copies.",
        INFERENCE,
    )
    validation_processes: int = setting(
        1,
        "Helper processes, per serving process, that may check uploaded models at once; further uploads wait "
        "their turn. A model whose .onnx file is bigger than MDS_VALIDATION_IN_PROCESS_MAX_BYTES is checked in "
        "a helper spawned for it, which takes about three times the file in memory and gives it back when it ends.",
        INFERENCE,
    )
    validation_in_process_max_bytes: int = setting(
        16 * MiB,
        "Uploaded models whose .onnx file is at most this many bytes are checked in the serving process "
        "(faster; it grows by about three times the file meanwhile); bigger ones in a helper process.",
        INFERENCE,
    )
    inline_run_max_us: int = setting(
        250,
        "Models whose recent runs average under this many microseconds of CPU time (wall time on a GPU) run "
        "on the event loop (no thread hop); 0 always uses the inference threads.",
        INFERENCE,
    )
    resolve_ttl_seconds: float = setting(
        1.0,
        "Predict reuses a (model, version) lookup this many seconds; "
        "changes made through another server sharing the storage show within it.",
        INFERENCE,
    )
    model_dir: str = setting(
        "",
        "At start, `mds serve` registers each NAME.onnx and each NAME/ folder holding model.onnx (and its external "
        "data) here as model NAME, as a new version only when its files changed; empty: none.",
        INFERENCE,
    )
    model_name: str = setting("", "Serve the only model of MDS_MODEL_DIR under this name instead.", INFERENCE)

    execution_providers: str = setting(
        "cpu",
        "onnxruntime execution providers for versions uploaded without their own, preferred first, among "
        "tensorrt, cuda and cpu (e.g. cuda,cpu). A node the first cannot run goes to the next; a model only "
        "falls back to the CPU when cpu is listed. Providers this server lacks are skipped, with a warning.",
        GPUS,
    )
    gpu_memory_bytes: int = setting(
        16 * GiB,
        "Device memory that model sessions may hold on each GPU, in bytes: the sum of their limits stays under "
        "it, evicting that GPU's least recently used session first.",
        GPUS,
    )
    gpu_session_memory_bytes: int = setting(
        4 * GiB,
        "The most device memory one session may hold, in bytes (onnxruntime's CUDA arena limit, grown only by "
        "what runs ask for; TensorRT's workspace), unless its version sets its own.",
        GPUS,
    )

    redis_url: str = setting(
        "",
        "Redis for the job queue, with `mds worker` processes running the jobs; empty: `mds serve` runs jobs itself.",
        JOBS,
    )
    redis_namespace: str = setting("mds", "Prefix of the job queue's Redis keys.", JOBS)
    job_threads: int = setting(1, "Threads running jobs in each worker (or in `mds serve`, without Redis).", JOBS)
    job_batch_rows: int = setting(4096, "Rows per batch when a job does not say.", JOBS)
    max_job_batch_rows: int = setting(
        1 << 20, "The most rows per batch a job may ask for (CreateJob.batch_rows).", JOBS
    )
    job_heartbeat_ms: int = setting(
        15000, "Milliseconds until the jobs of a worker that stopped answering go to another worker.", JOBS
    )
    job_commit_ms: int = setting(
        1000,
        "Batches run this many milliseconds (or until 16 MiB of outputs) between "
        "stored results and progress updates; 0 stores every batch on its own.",
        JOBS,
    )
    max_job_input_bytes: int = setting(16 * GiB, "Largest job input, in bytes.", JOBS)


AT_LEAST_ONE = (
    "processes",
    "max_model_bytes",
    "model_cache_bytes",
    "shared_weights_min_bytes",
    "max_message_bytes",
    "stream_max_in_flight",
    "max_inputs",
    "max_rank",
    "max_elements",
    "max_string_bytes",
    "inference_threads",
    "job_batch_rows",
    "max_job_batch_rows",
    "job_threads",
    "max_job_input_bytes",
    "validation_processes",
    "gpu_memory_bytes",
    "gpu_session_memory_bytes",
)
RENAMED = {"workers": "processes", "job_workers": "job_threads"}  # old name: new name; the old one still works


def parse(kind: type, raw: str):
    """A setting's value from its text; booleans accept 1/0, true/false, yes/no, on/off."""
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(raw)
        return lowered in ("1", "true", "yes", "on")
    return kind(raw)


def env_name(field_name: str) -> str:
    return "MDS_" + field_name.upper()


def warn_renamed(old: str, new: str, ignored: bool = False) -> None:
    """One warning line for a deprecated setting name (`old`, an env variable or flag) still in use."""
    log.warning(f"{old} is deprecated, use {new}" + (f"; ignored because {new} is set" if ignored else ""))


def _raw_values(environment: dict[str, str | None]) -> dict[str, tuple[str, str]]:
    """Each set setting's (variable, text); a renamed setting's old variable counts when the new one is unset."""
    raw = {f.name: (env_name(f.name), environment.get(env_name(f.name))) for f in fields(Settings)}
    for old, new in RENAMED.items():
        if old_raw := environment.get(env_name(old)):
            new_set = bool(raw[new][1])
            warn_renamed(env_name(old), env_name(new), ignored=new_set)
            if not new_set:
                raw[new] = (env_name(old), old_raw)
    return {name: (variable, text) for name, (variable, text) in raw.items() if text}


def load_settings(**overrides) -> Settings:
    """Defaults < .env file (found from the working folder up) < environment < `overrides` (None ignored)."""
    environment = {**dotenv_values(find_dotenv(usecwd=True)), **os.environ}
    kinds = {f.name: type(f.default) for f in fields(Settings)}
    values = {}
    for name, (variable, raw) in _raw_values(environment).items():
        try:
            values[name] = parse(kinds[name], raw)
        except ValueError:
            raise SystemExit(f"error: {variable}={raw!r} is not a valid {kinds[name].__name__}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = Settings(**values)
    if settings.auth not in ("auto", "on", "off"):
        raise SystemExit(f"error: MDS_AUTH must be on, off or auto, got {settings.auth!r}")
    for name in AT_LEAST_ONE:
        if getattr(settings, name) < 1:
            raise SystemExit(f"error: {env_name(name)} must be at least 1, got {getattr(settings, name)}")
    if settings.gpu_session_memory_bytes > settings.gpu_memory_bytes:
        raise SystemExit(
            f"error: MDS_GPU_SESSION_MEMORY_BYTES ({settings.gpu_session_memory_bytes}) must not exceed "
            f"MDS_GPU_MEMORY_BYTES ({settings.gpu_memory_bytes})"
        )
    if settings.grpc_stream_window_bytes < 0:
        raise SystemExit(
            f"error: MDS_GRPC_STREAM_WINDOW_BYTES must be 0 or more, got {settings.grpc_stream_window_bytes}"
        )
    return settings
