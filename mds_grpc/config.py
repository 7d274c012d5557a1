"""Settings from MDS_* environment variables (and a .env file), overridable by CLI flags."""

import os
from dataclasses import dataclass, fields
from pathlib import Path

from dotenv import dotenv_values, find_dotenv

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class Settings:
    """Each field `x` is read from `MDS_X`; `.env.example` documents them all."""

    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    workers: int = 1  # serving processes sharing the port (SO_REUSEPORT), each with its own models loaded
    data_dir: Path = Path("data")
    log_dir: Path = Path("logs")
    log_level: str = "INFO"
    # API keys: "on", "off", or "auto" (on whenever MongoDB is configured, off for the embedded default).
    auth: str = "auto"
    auth_cache_seconds: float = 5.0  # a revoked key is refused within this long
    auth_open_probes: bool = True  # health, reflection and V2 live/ready/metadata answer without a key
    # TLS: PEM files. With a client CA, clients must present a certificate it signed (mutual TLS).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    max_model_bytes: int = 4 * GiB
    model_cache_bytes: int = 2 * GiB
    max_message_bytes: int = 64 * MiB
    stream_max_in_flight: int = 8
    # Per request, checked before anything is allocated (RESOURCE_EXHAUSTED past them).
    max_inputs: int = 64
    max_rank: int = 16
    max_elements: int = 1 << 28
    max_string_bytes: int = 1 << 20
    inference_threads: int = os.cpu_count() or 2
    ort_intra_op_threads: int = 0
    inline_run_max_us: int = 250  # models whose runs average under this run on the event loop
    shutdown_grace_seconds: float = 10.0
    backend_check_seconds: float = 2.0
    resolve_ttl_seconds: float = 1.0  # how long a (model, version) lookup is reused by Predict
    metrics_port: int = 0  # Prometheus /metrics on grpc_host:metrics_port; 0 turns it off
    # Production backends; empty means the embedded default (SQLite, local folder).
    mongo_uri: str = ""
    mongo_database: str = "mds"
    s3_endpoint: str = ""
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_bucket: str = "mds-models"
    s3_secure: bool = False
    s3_region: str = ""
    # Bulk jobs: Redis for the Dramatiq queue (empty: the server runs jobs itself, in-process).
    redis_url: str = ""
    redis_namespace: str = "mds"
    job_batch_rows: int = 4096
    max_job_batch_rows: int = 1 << 20  # the most rows per run a job may ask for
    job_workers: int = 1
    job_heartbeat_ms: int = 15000
    job_commit_ms: int = 1000  # batches run this long (or to 16 MiB of outputs) between recorded results; 0: each
    max_job_input_bytes: int = 16 * GiB


AT_LEAST_ONE = ("workers", "max_model_bytes", "model_cache_bytes", "max_message_bytes", "stream_max_in_flight", "max_inputs",
                "max_rank", "max_elements", "max_string_bytes", "inference_threads", "job_batch_rows", "max_job_batch_rows", "job_workers",
                "max_job_input_bytes")


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


def load_settings(**overrides) -> Settings:
    """Defaults < .env file (found from the working folder up) < environment < `overrides` (None ignored)."""
    environment = {**dotenv_values(find_dotenv(usecwd=True)), **os.environ}
    values = {}
    for f in fields(Settings):
        raw = environment.get(env_name(f.name))
        if raw is not None and raw != "":
            try:
                values[f.name] = parse(type(f.default), raw)
            except ValueError:
                raise SystemExit(f"error: {env_name(f.name)}={raw!r} is not a valid {type(f.default).__name__}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = Settings(**values)
    if settings.auth not in ("auto", "on", "off"):
        raise SystemExit(f"error: MDS_AUTH must be on, off or auto, got {settings.auth!r}")
    for name in AT_LEAST_ONE:
        if getattr(settings, name) < 1:
            raise SystemExit(f"error: {env_name(name)} must be at least 1, got {getattr(settings, name)}")
    return settings
