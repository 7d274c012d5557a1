"""The gRPC server: wires storage, core and front doors; health, reflection, graceful shutdown."""

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mds.v1 import inference_service_pb2, inference_service_pb2_grpc, model_service_pb2, model_service_pb2_grpc
from mds_grpc.api.access_log import AccessLogInterceptor
from mds_grpc.api.inference_servicer import InferenceServicer
from mds_grpc.api.model_servicer import ModelServicer
from mds_grpc.config import Settings
from mds_grpc.core.errors import Unavailable
from mds_grpc.core.inference import InferenceEngine
from mds_grpc.core.model_cache import ModelCache
from mds_grpc.core.registry import ModelRegistry
from mds_grpc.storage import open_blob_store, open_metadata_store

log = logging.getLogger("mds.server")
SERVICES = (
    model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
    inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
)


def build_registry(settings: Settings) -> ModelRegistry:
    """MongoDB and S3 when configured; otherwise the embedded default under data_dir."""
    data = settings.data_dir
    blobs = open_blob_store(settings)
    cache = ModelCache(blobs, data / "models", settings.model_cache_bytes, settings.ort_intra_op_threads)
    return ModelRegistry(open_metadata_store(settings), blobs, cache, data / "tmp", settings.max_model_bytes)


async def check_backends(registry: ModelRegistry, health_servicer) -> None:
    """Health is SERVING while every backend answers, NOT_SERVING while one does not."""
    try:
        await asyncio.to_thread(registry.ping)
        status = health_pb2.HealthCheckResponse.SERVING
    except Unavailable as error:
        log.warning("backend unavailable", extra={"error": str(error)})
        status = health_pb2.HealthCheckResponse.NOT_SERVING
    for service in ("", *SERVICES):
        await health_servicer.set(service, status)


async def watch_backends(registry: ModelRegistry, health_servicer, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        await check_backends(registry, health_servicer)


async def serve(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then drain in-flight RPCs within the grace period."""
    registry = build_registry(settings)
    registry.sweep_local_copies()
    executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="onnxruntime")
    server = grpc.aio.server(
        interceptors=[AccessLogInterceptor()],
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
        ],
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(registry), server)
    inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(
        InferenceServicer(InferenceEngine(registry, executor), settings.stream_max_in_flight), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    port = server.add_insecure_port(address)
    await check_backends(registry, health_servicer)
    await server.start()
    watcher = asyncio.ensure_future(watch_backends(registry, health_servicer, settings.backend_check_seconds))
    log.info("serving", extra={"address": address, "port": port, "data_dir": str(settings.data_dir)})

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down", extra={"grace_seconds": settings.shutdown_grace_seconds})
    watcher.cancel()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(settings.shutdown_grace_seconds)
    executor.shutdown(wait=True, cancel_futures=True)
    log.info("stopped")
