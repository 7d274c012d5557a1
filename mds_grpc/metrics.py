"""Prometheus metrics, served over HTTP on MDS_METRICS_PORT (0: off). Cheap enough to stay on."""

import math
from collections.abc import Callable
from functools import lru_cache, partial
from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter("mds_requests", "RPCs handled, by method, model and status code", ["method", "model", "code"])
REQUEST_SECONDS = Histogram("mds_request_seconds", "RPC duration", ["method", "model"], buckets=LATENCY_BUCKETS)
QUEUE_SECONDS = Histogram(
    "mds_inference_queue_seconds",
    "Time a run waited for an inference thread (runs on the event loop wait for none and are not counted)",
    ["model", "version"],
    buckets=LATENCY_BUCKETS,
)
COMPUTE_SECONDS = Histogram(
    "mds_inference_compute_seconds", "onnxruntime run time", ["model", "version"], buckets=LATENCY_BUCKETS
)
BATCH_ROWS = Histogram(
    "mds_inference_batch_rows",
    "Rows along the first dimension per onnxruntime run",
    ["model", "version"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 16384),
)
ALIAS_REQUESTS = Counter(
    "mds_alias_requests", "Requests through an alias, by the version they were routed to", ["model", "alias", "version"]
)
MODEL_CACHE = Counter("mds_model_cache_events", "Model cache lookups and changes", ["event"])
DEVICE_SESSIONS = Gauge("mds_device_sessions", "Model sessions loaded on each GPU", ["device"])
DEVICE_MEMORY = Gauge(
    "mds_device_memory_bytes", "Device memory the sessions on each GPU may hold (the sum of their limits)", ["device"]
)
State = TypeVar("State", bound=str)  # a job state, labelled by its lower-case name
JOBS = Gauge("mds_jobs", "Jobs by state, read from the job store at each scrape (queued: the queue's depth)", ["state"])


# labels() takes a lock and builds a key on every call; the children it returns are kept here.
@lru_cache(maxsize=4096)
def _rpc_series(method: str, model: str, code: str):
    return REQUESTS.labels(method, model, code), REQUEST_SECONDS.labels(method, model)


@lru_cache(maxsize=1024)
def _run_series(model: str, version: int):
    labels = (model, str(version))
    return QUEUE_SECONDS.labels(*labels), COMPUTE_SECONDS.labels(*labels), BATCH_ROWS.labels(*labels)


@lru_cache(maxsize=1024)
def _alias_series(model: str, alias: str, version: int):
    return ALIAS_REQUESTS.labels(model, alias, str(version))


def alias_request(model: str, alias: str, version: int) -> None:
    """Count a request routed through `alias` to `version` (canary splits show here)."""
    _alias_series(model, alias, version).inc()


def cache_event(event: str) -> None:
    """Count a model cache hit, load or eviction."""
    _cache_series(event).inc()


@lru_cache(maxsize=8)
def _cache_series(event: str):
    return MODEL_CACHE.labels(event)


def observe_rpc(method: str, model: str, code: str, seconds: float) -> None:
    count, latency = _rpc_series(method, model, code)
    count.inc()
    latency.observe(seconds)


def observe_run(model: str, version: int, queued: float | None, computed: float, rows: int) -> None:
    """One onnxruntime run; `queued` is None for a run on the event loop, which never waits for a thread."""
    queue, compute, batch = _run_series(model, version)
    if queued is not None:
        queue.observe(queued)
    compute.observe(computed)
    batch.observe(rows)


def watch_jobs(count: Callable[[State], int], states: tuple[State, ...]) -> None:
    """mds_jobs{state} calls `count(state)` at each scrape; NaN while the store cannot answer."""

    def reading(state: State) -> float:
        try:
            return count(state)
        except Exception:  # a scrape must not fail with the job store, which health reports already
            return math.nan

    for state in states:
        JOBS.labels(state.lower()).set_function(partial(reading, state))


def device_usage(device: int, sessions: int, memory_bytes: int) -> None:
    DEVICE_SESSIONS.labels(str(device)).set(sessions)
    DEVICE_MEMORY.labels(str(device)).set(memory_bytes)


def watch_gpus() -> None:
    """mds_gpu_utilization_ratio and mds_gpu_memory_used_bytes per GPU, read through NVML at each scrape;
    nothing when nvidia-ml-py or a driver is missing."""
    try:
        import pynvml  # optional: installed with the GPU build

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # no package, no driver, no device
        return
    utilization = Gauge("mds_gpu_utilization_ratio", "GPU busy time over the last sample period (NVML)", ["device"])
    used = Gauge("mds_gpu_memory_used_bytes", "Device memory in use by every process (NVML)", ["device"])

    def busy(handle) -> float:
        return pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100

    def memory(handle) -> float:
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used

    for index, handle in enumerate(handles):
        utilization.labels(str(index)).set_function(partial(busy, handle))
        used.labels(str(index)).set_function(partial(memory, handle))


def serve_metrics(host: str, port: int) -> None:
    """Expose /metrics on host:port in a background thread (nothing when port is 0)."""
    if port:
        try:
            start_http_server(port, addr=host)
        except OSError as error:
            raise SystemExit(
                f"error: cannot serve metrics on {host}:{port} (MDS_METRICS_PORT): {error.strerror}"
            ) from None
