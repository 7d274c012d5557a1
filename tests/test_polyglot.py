"""Go and Node backends, using the generated stubs in gen/go and gen/ts, against a live server."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import onnx_models

TESTS = Path(__file__).parent


@pytest.fixture
def fixtures(tmp_path) -> Path:
    """The model, and what in-process onnxruntime gives for the inputs the clients send."""
    model = onnx_models.dense()
    (tmp_path / "model.onnx").write_bytes(model)
    x = np.random.default_rng(21).standard_normal((4, 8)).astype(np.float32)
    scores, label = ort.InferenceSession(model).run(["scores", "label"], {"x": x})
    (tmp_path / "expected.json").write_text(
        json.dumps(
            {
                "rows": 4,
                "features": 8,
                "x": x.ravel().tolist(),
                "scores": scores.ravel().tolist(),
                "label": label.ravel().tolist(),
            }
        )
    )
    return tmp_path


def run(command: list[str], cwd: Path, server, fixtures: Path, name: str) -> None:
    env = {"MDS_ADDRESS": server.address, "MDS_FIXTURES": str(fixtures), "MDS_MODEL_NAME": name}
    result = subprocess.run(command, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_go_client(server, fixtures, unique):
    run(["go", "test", "-count=1", "./..."], TESTS / "go", server, fixtures, unique)


def test_node_client(server, fixtures, unique):
    run(["node", "--test", "client.test.mjs"], TESTS / "node", server, fixtures, unique)
