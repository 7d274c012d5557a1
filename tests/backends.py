"""Private instances of the real backing servers, for tests that stop and restart them."""

import os
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path

from harness import free_port, wait_until
from local_machine import BIN

S3_USER, S3_PASSWORD = "faultadmin", "faultadmin-secret"


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Backend:
    """One server process on a fixed port and folder, so a restart keeps its data."""

    def __init__(self, name: str, folder: Path, argv, env=None):
        self.name, self.folder = name, folder
        self.port = free_port()
        self.argv = argv(self.port, folder)
        self.env = {**os.environ, **(env or {})}
        self.process = None

    def start(self) -> "Backend":
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder.with_suffix(".log"), "ab")
        self.process = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: _accepts(self.port), what=f"{self.name} to listen")
        return self

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        self.process.wait(30)
        wait_until(lambda: not _accepts(self.port), what=f"{self.name} to close its port")


def ferretdb(folder: Path) -> Backend:
    return Backend(
        "FerretDB",
        folder,
        lambda port, d: [
            str(BIN / "ferretdb"),
            "--handler=sqlite",
            f"--sqlite-url=file:{d}/",
            f"--state-dir={d}",
            f"--listen-addr=127.0.0.1:{port}",
            "--telemetry=disable",
            "--debug-addr=-",
        ],
    )


def minio(folder: Path) -> Backend:
    return Backend(
        "MinIO",
        folder,
        lambda port, d: [
            str(BIN / "minio"),
            "server",
            str(d),
            "--address",
            f"127.0.0.1:{port}",
            "--console-address",
            f"127.0.0.1:{free_port()}",
            "--quiet",
        ],
        env={"MINIO_ROOT_USER": S3_USER, "MINIO_ROOT_PASSWORD": S3_PASSWORD},
    )


def redis(folder: Path) -> Backend:
    return Backend(
        "Redis",
        folder,
        lambda port, d: [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(d),
            "--appendonly",
            "yes",
            "--save",
            "",
        ],
    )


def server_env(mongo: Backend, s3: Backend, queue: Backend) -> dict[str, str]:
    return {
        "MDS_MONGO_URI": f"mongodb://127.0.0.1:{mongo.port}/",
        "MDS_S3_ENDPOINT": f"127.0.0.1:{s3.port}",
        "MDS_REDIS_URL": f"redis://127.0.0.1:{queue.port}/0",
        "MDS_S3_ACCESS_KEY": S3_USER,
        "MDS_S3_SECRET_KEY": S3_PASSWORD,
        "MDS_S3_BUCKET": "models",
        "MDS_BACKEND_CHECK_SECONDS": "0.2",
        "MDS_AUTH": "off",
    }


@contextmanager
def private_services(folder: Path):
    """FerretDB, MinIO and Redis of their own under `folder`, stopped on exit: (mongo, s3, queue)."""
    started = []
    try:
        for name, backend in (("ferretdb", ferretdb), ("minio", minio), ("redis", redis)):
            started.append(backend(folder / name).start())
        yield tuple(started)
    finally:
        for backend in started:
            backend.stop()
