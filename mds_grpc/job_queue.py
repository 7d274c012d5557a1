"""Dramatiq wiring for bulk jobs: a Redis broker when configured, else an in-process stub broker."""

import logging

import dramatiq
from dramatiq.brokers.stub import StubBroker

from mds_grpc.config import Settings
from mds_grpc.core.errors import Unavailable
from mds_grpc.core.job_runner import JobRunner

log = logging.getLogger("mds.jobs")
ACTOR_NAME = "mds_run_job"
QUEUE_NAME = "mds-jobs"
DAY_MS = 24 * 3600 * 1000


def make_broker(settings: Settings) -> dramatiq.Broker:
    if settings.redis_url:
        from dramatiq.brokers.redis import RedisBroker

        # Messages of a worker that died are handed to others once its heartbeat is
        # job_heartbeat_ms old; maintenance runs on 10% of broker calls to notice soon.
        return RedisBroker(
            url=settings.redis_url,
            namespace=settings.redis_namespace,
            heartbeat_timeout=settings.job_heartbeat_ms,
            maintenance_chance=100_000,
            socket_timeout=5,
            socket_connect_timeout=3,
        )
    return StubBroker()


def declare_actor(broker: dramatiq.Broker, runner: JobRunner) -> dramatiq.Actor:
    """The actor that runs a job; Unavailable backends make Dramatiq retry it later."""

    def run_job(job_id: str) -> None:
        runner.run(job_id)

    return dramatiq.actor(
        actor_name=ACTOR_NAME,
        queue_name=QUEUE_NAME,
        broker=broker,
        time_limit=DAY_MS,
        max_retries=100,
        min_backoff=500,
        max_backoff=30_000,
        retry_when=lambda retries, error: isinstance(error, Unavailable),
    )(run_job)


def ping_broker(broker: dramatiq.Broker) -> None:
    """Raise Unavailable when the Redis broker cannot be reached."""
    client = getattr(broker, "client", None)
    if client is None:
        return
    try:
        client.ping()
    except Exception as error:  # redis-py raises ConnectionError, TimeoutError and friends
        raise Unavailable(
            f"Redis at {client.connection_pool.connection_kwargs.get('host')}:"
            f"{client.connection_pool.connection_kwargs.get('port')} is unreachable ({error})"
        ) from None


def start_worker(broker: dramatiq.Broker, threads: int) -> dramatiq.Worker:
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=500)
    worker.start()
    return worker
