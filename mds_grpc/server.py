"""The gRPC server: wires storage, core and front doors; health, reflection, graceful shutdown."""

import asyncio
import contextlib
import importlib
import logging
import os
import shutil
import signal
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import dramatiq
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from mds.oip import grpc_service_pb2, grpc_service_pb2_grpc
from mds.v1 import (
    http_files_pb2,
    http_files_pb2_grpc,
    inference_service_pb2,
    inference_service_pb2_grpc,
    job_service_pb2,
    job_service_pb2_grpc,
    model_service_pb2,
    model_service_pb2_grpc,
)
from mds_grpc import job_queue, metrics
from mds_grpc.api import contract
from mds_grpc.api.auth import Guard
from mds_grpc.api.http_files import HttpDownloadServicer, HttpUploadServicer
from mds_grpc.api.inference_servicer import InferenceServicer
from mds_grpc.api.job_servicer import JobServicer
from mds_grpc.api.model_servicer import ModelServicer
from mds_grpc.api.oip_servicer import OipServicer
from mds_grpc.api.rpc_wrapper import ServedServer
from mds_grpc.config import Settings
from mds_grpc.core import runtime
from mds_grpc.core.aliases import Aliases
from mds_grpc.core.auth import Authenticator
from mds_grpc.core.errors import InvalidArgument, MdsError
from mds_grpc.core.inference import InferenceEngine
from mds_grpc.core.job_records import JobState
from mds_grpc.core.job_runner import JobRunner
from mds_grpc.core.jobs import JobManager
from mds_grpc.core.limits import JobLimits, TensorLimits
from mds_grpc.core.model_cache import ModelCache, gather_orders, order_file
from mds_grpc.core.model_folder import register_folder
from mds_grpc.core.placement import GPU_PROVIDERS, Placer, parse_providers
from mds_grpc.core.prepacked import PrepackedCopies
from mds_grpc.core.registry import ModelRegistry
from mds_grpc.core.stores import Storage
from mds_grpc.core.validation import Validator
from mds_grpc.logs import AccessLog
from mds_grpc.storage import open_storage

if TYPE_CHECKING:
    from mds_grpc.api.websocket import PredictionSocket

log = logging.getLogger("mds.server")
SERVICES = tuple(
    module.DESCRIPTOR.services_by_name[name].full_name
    for module, name in (
        (model_service_pb2, "ModelService"),
        (inference_service_pb2, "InferenceService"),
        (job_service_pb2, "JobService"),
        (http_files_pb2, "HttpUploadService"),
        (http_files_pb2, "HttpDownloadService"),
        (grpc_service_pb2, "GRPCInferenceService"),
    )
)


@dataclass(frozen=True)
class Core:
    """Everything the front doors delegate to."""

    storage: Storage
    registry: ModelRegistry
    aliases: Aliases
    broker: dramatiq.Broker
    run_job: dramatiq.Actor
    jobs: JobManager

    def ping(self) -> None:
        self.storage.ping()
        job_queue.ping_broker(self.broker)

    async def is_ready(self) -> bool:
        """Whether every backend answers; any failure (unreachable, refused, misconfigured) means no."""
        try:
            await asyncio.to_thread(self.ping)
        except Exception as error:
            log.warning("backend not ready", extra={"error": str(error)})
            return False
        return True


def job_work_dir(root: Path) -> Path:
    """This process's folder for job files; folders of processes that died are removed."""
    if root.is_dir():
        for folder in root.iterdir():
            if folder.name.isdigit() and not Path(f"/proc/{folder.name}").exists():
                shutil.rmtree(folder, ignore_errors=True)
    return root / str(os.getpid())


def build_core(settings: Settings, cache_folder: str = "models") -> Core:
    """MongoDB, S3 and Redis when configured; otherwise the embedded default under data_dir.

    Exits with one line naming MDS_DATA_DIR when the folder cannot be used."""
    try:
        return _build_core(settings, cache_folder)
    except OSError as error:
        raise SystemExit(
            f"error: cannot use MDS_DATA_DIR={settings.data_dir}: {error.strerror or error} ({error.filename or ''})"
        ) from None


def make_placer(settings: Settings) -> Placer:
    """This server's execution providers; exits with one line when it has none of MDS_EXECUTION_PROVIDERS."""
    try:
        wanted = parse_providers(settings.execution_providers)
    except InvalidArgument as error:
        raise SystemExit(f"error: MDS_EXECUTION_PROVIDERS={settings.execution_providers!r}: {error}") from None
    available = runtime.available_providers()
    missing = [name for name in wanted if name not in available]
    if len(missing) == len(wanted):
        raise SystemExit(
            f"error: MDS_EXECUTION_PROVIDERS={settings.execution_providers!r} names no provider this server has "
            f"({', '.join(available)}); GPUs need onnxruntime-gpu on a CUDA machine (docs/gpu.md)"
        )
    if missing:
        log.warning(f"MDS_EXECUTION_PROVIDERS: this server has no {', '.join(missing)}; models run on the next listed")
    return Placer(
        wanted, available, settings.gpu_memory_bytes, settings.gpu_session_memory_bytes, settings.data_dir / "engines"
    )


def _build_core(settings: Settings, cache_folder: str) -> Core:
    data = settings.data_dir
    storage = open_storage(settings)
    helpers = Validator(
        settings.validation_processes, settings.validation_in_process_max_bytes, settings.ort_intra_op_threads
    )
    cache = ModelCache(
        storage.blobs,
        data / cache_folder,
        settings.model_cache_bytes,
        settings.ort_intra_op_threads,
        make_placer(settings),
        shared_weights_min_bytes=settings.shared_weights_min_bytes,
        # S3 blobs are downloaded: into one copy per host, which each process's model folders link to
        shared_files=data / "models" / ".files" if settings.s3_endpoint else None,
        prepacked=PrepackedCopies(data / "prepacked") if settings.prepacked_copies else None,
        run_helper=helpers.run,
    )
    registry = ModelRegistry(
        storage.metadata,
        storage.blobs,
        cache,
        data / "tmp",
        settings.max_model_bytes,
        settings.resolve_ttl_seconds,
        max_side_files=settings.max_model_files,
        validator=helpers,
    )
    broker = job_queue.make_broker(settings)
    run_job = job_queue.declare_actor(
        broker,
        JobRunner(
            storage,
            job_work_dir(data / "jobs"),
            settings.ort_intra_op_threads,
            settings.job_commit_ms / 1000,
            placer=cache.placer,
        ),
    )
    limits = JobLimits(
        settings.job_batch_rows,
        settings.max_job_batch_rows,
        settings.max_job_input_bytes,
        min(settings.max_message_bytes // 2, JobLimits.result_message_bytes),
        TensorLimits(settings.max_inputs, settings.max_rank, settings.max_elements, settings.max_string_bytes),
    )
    aliases = Aliases(storage.metadata, registry, settings.resolve_ttl_seconds)
    jobs = JobManager(storage, registry, data / "tmp", run_job.send, limits, aliases)
    return Core(storage, registry, aliases, broker, run_job, jobs)


def check_can_listen(host: str, port: int, port_setting: str = "MDS_GRPC_PORT") -> None:
    """Exit with one line when the port cannot be bound (grpc itself logs a C++ error, then raises)."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror:
        return  # a name only grpc resolves: let it bind, and fail, itself
    try:
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as error:
        raise SystemExit(
            f"error: cannot listen on {host}:{port} (MDS_GRPC_HOST, {port_setting}): {error.strerror or error}"
        ) from None


def check_ports(settings: Settings) -> None:
    """Exit with one line when the gRPC port, or the WebSocket port when on, cannot be bound."""
    check_can_listen(settings.grpc_host, settings.grpc_port)
    if settings.websocket_port:
        check_can_listen(settings.grpc_host, settings.websocket_port, "MDS_WEBSOCKET_PORT")


def websocket_tls(settings: Settings) -> ssl.SSLContext | None:
    """The gRPC port's TLS (and client certificates) for the WebSocket port; None serves plaintext."""
    if not settings.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    if settings.tls_client_ca_file:
        context.load_verify_locations(settings.tls_client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def start_websocket(
    settings: Settings,
    process: int | None,
    inference: InferenceServicer,
    guard: Guard | None,
    access_log: AccessLog,
    health_servicer: health.aio.HealthServicer,
    tls: ssl.SSLContext | None,
) -> "PredictionSocket | None":
    """PredictStream over WebSocket when MDS_WEBSOCKET_PORT is set; the websockets package is imported only then,
    on a thread, so that gRPC requests (and the models they load) go on meanwhile."""
    if not settings.websocket_port:
        return None
    module = await asyncio.to_thread(importlib.import_module, "mds_grpc.api.websocket")
    websocket: PredictionSocket = module.PredictionSocket(inference, guard, access_log, health_servicer)
    await websocket.start(
        settings.grpc_host, settings.websocket_port, settings.max_message_bytes, tls, shared=process is not None
    )
    return websocket


def stream_window(window_bytes: int) -> list[tuple[str, int]]:
    """gRPC options for a fixed flow-control window per stream (MDS_GRPC_STREAM_WINDOW_BYTES); none for 0."""
    return [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", window_bytes)] if window_bytes else []


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured PEM files; None serves plaintext."""
    if not (settings.tls_cert_file or settings.tls_key_file):
        if settings.tls_client_ca_file:
            raise SystemExit("error: MDS_TLS_CLIENT_CA_FILE needs MDS_TLS_CERT_FILE and MDS_TLS_KEY_FILE too")
        return None
    if not (settings.tls_cert_file and settings.tls_key_file):
        raise SystemExit("error: TLS needs both MDS_TLS_CERT_FILE and MDS_TLS_KEY_FILE")
    try:
        pair = (Path(settings.tls_key_file).read_bytes(), Path(settings.tls_cert_file).read_bytes())
        client_ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    except OSError as error:
        raise SystemExit(f"error: cannot read a TLS file: {error}") from None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=bool(client_ca))


async def check_backends(core: Core, health_servicer) -> None:
    """Health is SERVING while every backend answers, NOT_SERVING while one does not."""
    status = (
        health_pb2.HealthCheckResponse.SERVING if await core.is_ready() else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for service in ("", *SERVICES):
        await health_servicer.set(service, status)


async def watch_backends(core: Core, health_servicer, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        await check_backends(core, health_servicer)


async def register_model_dir(registry: ModelRegistry, settings: Settings) -> None:
    """The models of MDS_MODEL_DIR, registered before serving; a problem stops the start with one line."""
    if not settings.model_dir:
        if settings.model_name:
            raise SystemExit("error: MDS_MODEL_NAME needs MDS_MODEL_DIR")
        return
    try:
        await register_folder(registry, Path(settings.model_dir), settings.model_name)
    except MdsError as error:
        raise SystemExit(f"error: {error}") from None


def start_embedded_worker(core: Core, settings: Settings, requeue: bool) -> dramatiq.Worker:
    """Without Redis the server runs jobs itself; with `requeue`, jobs a previous run left unfinished go again."""
    worker = job_queue.start_worker(core.broker, settings.job_threads)
    for state in (JobState.QUEUED, JobState.RUNNING) if requeue else ():
        after = None
        while page := core.storage.jobs.list_page(state, None, after, 1000):
            for job in page:
                core.run_job.send(job.id)
            after = (page[-1].created_at, page[-1].id)
    return worker


async def serve(settings: Settings, process: int | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain in-flight RPCs within the grace period.

    `process` numbers one of several processes sharing the port (mds_grpc.processes): each
    keeps its own model folder and metrics port (MDS_METRICS_PORT + process), and the parent
    has already swept what an earlier run left behind.
    """
    rpcs = contract.rpcs((*SERVICES, *contract.PROBE_SERVICES))  # exits when a served method declares no scope
    stop = asyncio.Event()
    stop_signals: list[signal.Signals] = []  # as received

    def on_signal(signum: signal.Signals) -> None:
        stop_signals.append(signum)
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    if process is None:  # serving processes sharing a port: their supervisor checked it before starting them
        check_ports(settings)
    core = build_core(settings, "models" if process is None else f"models/process-{process}")
    cache = core.registry.cache
    if settings.preload_models:  # read before anything loads; several processes: their supervisor gathered
        if process is None:
            gather_orders(settings.data_dir)
        cache.order_file = order_file(settings.data_dir, process)
        cache.recall(order_file(settings.data_dir))
    if process is None:
        core.registry.sweep_local_copies()
        await register_model_dir(core.registry, settings)  # several processes: their supervisor did
    # In the background from now on: sessions load on threads while the server starts, and once it serves.
    preloading = asyncio.ensure_future(cache.preload(core.registry.get))
    worker = None if settings.redis_url else start_embedded_worker(core, settings, requeue=not process)
    executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="onnxruntime")
    auth_on = settings.auth == "on" or settings.auth == "auto" and bool(settings.mongo_uri)
    guard = (
        Guard(
            Authenticator(core.storage.metadata.get_key, settings.auth_cache_seconds), rpcs, settings.auth_open_probes
        )
        if auth_on
        else None
    )
    if not auth_on and settings.grpc_host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "authentication is off on a non-loopback address: anyone who can reach "
            f"{settings.grpc_host}:{settings.grpc_port} can upload, delete and predict; set MDS_AUTH=on"
        )
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", int(process is not None)),
            *stream_window(settings.grpc_stream_window_bytes),
        ],
    )
    access_log = AccessLog()
    served = ServedServer(server, rpcs, guard, access_log)
    # Health and reflection: open, or (MDS_AUTH_OPEN_PROBES=false) behind the guard; never in the access log.
    probes = server if settings.auth_open_probes or guard is None else ServedServer(server, rpcs, guard, None)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(core.registry, core.aliases), served)
    engine = InferenceEngine(core.registry, executor, settings.inline_run_max_us / 1e6, core.aliases)
    limits = core.jobs.limits.tensors
    inference = InferenceServicer(engine, settings.stream_max_in_flight, limits)
    inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(inference, served)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        OipServicer(engine, core.is_ready, settings.stream_max_in_flight, limits), served
    )
    job_service_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(core.jobs, limits), served)
    http_files_pb2_grpc.add_HttpUploadServiceServicer_to_server(HttpUploadServicer(core.registry, core.jobs), served)
    http_files_pb2_grpc.add_HttpDownloadServiceServicer_to_server(HttpDownloadServicer(core.jobs), served)
    health_servicer = health.aio.HealthServicer()
    # The stubs ask for a whole server; registration only needs what ServedServer has.
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probes)  # type: ignore[arg-type]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer((*SERVICES, *contract.PROBE_SERVICES)), probes
    )
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    credentials = server_credentials(settings)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # an address check_can_listen could not probe, or a port taken since
        raise SystemExit(f"error: cannot listen on {address} (MDS_GRPC_HOST, MDS_GRPC_PORT)") from None
    await check_backends(core, health_servicer)
    metrics.watch_jobs(core.storage.jobs.count, (JobState.QUEUED, JobState.RUNNING))
    if set(core.registry.available_providers) & GPU_PROVIDERS:
        metrics.watch_gpus()
    metrics.serve_metrics(settings.grpc_host, settings.metrics_port and settings.metrics_port + (process or 0))
    await server.start()
    tls = websocket_tls(settings) if credentials else None
    websocket = await start_websocket(settings, process, inference, guard, access_log, health_servicer, tls)
    watcher = asyncio.ensure_future(watch_backends(core, health_servicer, settings.backend_check_seconds))
    log.info(
        "serving",
        extra={
            "address": address,
            "port": port,
            "websocket_port": settings.websocket_port,
            "pid": os.getpid(),
            "data_dir": str(settings.data_dir),
            "auth": auth_on,
            "tls": bool(credentials),
            "client_certificates": bool(settings.tls_client_ca_file),
        },
    )

    await stop.wait()
    watcher.cancel()
    preloading.cancel()  # versions it has not come to stay recorded
    await health_servicer.enter_graceful_shutdown()  # NOT_SERVING at once: balancers stop sending
    if stop_signals == [signal.SIGTERM] and settings.drain_seconds > 0:  # a second signal already: no drain
        log.info("draining", extra={"drain_seconds": settings.drain_seconds})
        stop.clear()
        with contextlib.suppress(TimeoutError):  # a second signal ends the drain early
            await asyncio.wait_for(stop.wait(), settings.drain_seconds)
    log.info("shutting down", extra={"grace_seconds": settings.shutdown_grace_seconds})
    stopping = [server.stop(settings.shutdown_grace_seconds)]
    if websocket is not None:
        stopping.append(websocket.stop(settings.shutdown_grace_seconds))
    await asyncio.gather(*stopping)
    cache.save_order()  # the order of use since the last load or eviction, for the next start
    if worker is not None:  # a job interrupted here resumes from its last batch at the next start
        await asyncio.to_thread(worker.stop, int(settings.shutdown_grace_seconds * 1000))
    executor.shutdown(wait=True, cancel_futures=True)
    access_log.flush()
    log.info("stopped")


def run_worker(settings: Settings) -> None:
    """`mds worker`: consume jobs from Redis until SIGTERM or SIGINT (even one sent while starting)."""
    if not settings.redis_url:
        raise SystemExit("error: mds worker needs MDS_REDIS_URL; without Redis, `mds serve` runs jobs itself")
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # held for sigwait; worker threads inherit the mask
    worker = job_queue.start_worker(build_core(settings).broker, settings.job_threads)
    log.info("worker started", extra={"threads": settings.job_threads})
    signal.sigwait(stop_signals)
    worker.stop(int(settings.shutdown_grace_seconds * 1000))  # unfinished jobs go back to the queue
    log.info("worker stopped")
