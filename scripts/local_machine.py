"""This machine as the project's tools, tests and benchmarks see it: the cache folder and free loopback ports."""

import os
import socket
from pathlib import Path

CACHE = Path(os.environ.get("MDS_CACHE", Path.home() / ".cache" / "mds"))  # the venv, tools, models (Makefile)
BIN = CACHE / "bin"  # grpcurl, buf, ghz and the backing servers (scripts/install_go_tools.sh, services.sh)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
