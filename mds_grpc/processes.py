"""`mds serve --processes N`: N serving processes on one port (SO_REUSEPORT), supervised by this one.

The kernel spreads connections over the processes. Each loads its own sessions; the weights of big models
with external data are memory-mapped from the same files, so the page cache holds one copy for all of them.
Storage, keys and jobs are shared through the configured stores. The supervisor only starts and watches:
it never imports onnxruntime, gRPC or a store's client (a helper process prepares the storage).
"""

import logging
import multiprocessing
import multiprocessing.connection
import signal
from concurrent.futures import ProcessPoolExecutor

from mds_grpc.config import Settings

log = logging.getLogger("mds.server")
PR_SET_PDEATHSIG = 1


class _Stop(Exception):
    """Raised in the supervisor by SIGTERM or SIGINT."""


def _stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def _serve_one(settings: Settings, process: int) -> None:
    import asyncio
    import ctypes
    import os

    from mds_grpc.logs import configure_logging
    from mds_grpc.server import serve

    # A serving process must not outlive its supervisor, even one killed with SIGKILL.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    parent = multiprocessing.parent_process()
    if parent is None or os.getppid() != parent.pid:
        return  # the supervisor died before prctl took effect
    configure_logging(settings.log_dir, settings.log_level, f"mds-{process}.log")
    asyncio.run(serve(settings, process))


def _prepare_storage(settings: Settings) -> None:
    """Once, in a helper process, before any serving process starts: check the ports, register MDS_MODEL_DIR's
    models, sweep what uploads left behind, and merge the records of the models each process had loaded."""
    import asyncio

    from mds_grpc.core.model_cache import gather_orders
    from mds_grpc.logs import configure_logging
    from mds_grpc.server import build_core, check_ports, register_model_dir

    configure_logging(settings.log_dir, settings.log_level)
    check_ports(settings)  # once, before any process shares the ports
    registry = build_core(settings).registry
    asyncio.run(register_model_dir(registry, settings))
    registry.sweep_local_copies()  # also drops the model folders and sessions registering made here
    if settings.preload_models:
        gather_orders(settings.data_dir)  # what each process used last time, for each to preload


def serve_processes(settings: Settings) -> None:
    """Run `settings.processes` servers until SIGTERM or SIGINT, or until one of them exits."""
    if settings.grpc_port == 0:
        raise SystemExit("error: MDS_PROCESSES > 1 needs a fixed MDS_GRPC_PORT: processes cannot share port 0")
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as helper:
        helper.submit(_prepare_storage, settings).result()  # its SystemExit (a bad setting) is raised here
    children = [
        spawn.Process(target=_serve_one, args=(settings, i), name=f"mds-serve-{i}") for i in range(settings.processes)
    ]
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)
    reason = "a serving process exited"
    try:
        for child in children:
            child.start()
        log.info("serving processes started", extra={"pids": [c.pid for c in children]})
        multiprocessing.connection.wait([c.sentinel for c in children])  # returns when one exits
    except _Stop as stop:
        reason = str(stop)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)  # already stopping
    terminated = [child for child in children if child.is_alive()]
    for child in terminated:
        child.terminate()  # SIGTERM: each drains its in-flight RPCs
    for child in children:
        if child.pid is not None:  # started
            child.join(settings.shutdown_grace_seconds + 30)
            if child.is_alive():  # stuck past its grace period: do not hang the supervisor with it
                child.kill()
                child.join()
    codes = {c.name: c.exitcode for c in children}
    log.info("stopped", extra={"reason": reason, "exit_codes": codes})
    # A process told to stop while still starting, before its signal handlers, ends by the signal: a clean stop.
    failed = [c for c in children if c.exitcode and not (c in terminated and c.exitcode == -signal.SIGTERM)]
    if reason.startswith("a serving") or failed:
        raise SystemExit(f"error: {reason}; exit codes {codes}")
