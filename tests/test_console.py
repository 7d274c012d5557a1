"""The web console at /ui/: Envoy serves the built page, and headless Chromium drives it against a real server.

The browser steps are in tests/browser/console*.test.mjs (playwright-core); their screenshots and downloads
stay in test-artefacts/console/.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from unittest import mock

import numpy as np
import onnxruntime as ort
import pytest
import requests

import onnx_models
from harness import REPO, EnvoyProcess, ServerProcess, chunked_input, create_key, upload_requests
from local_machine import free_port
from mds.v1 import job_service_pb2 as jobs_pb
from mds.v1 import model_service_pb2 as models_pb

ARTEFACTS = REPO / "test-artefacts" / "console"
BROWSER = REPO / "tests" / "browser"


@pytest.fixture(scope="module")
def built() -> None:
    """The console built from this checkout's web/ (Envoy serves what web/dist holds when it starts)."""
    subprocess.run(["npm", "run", "--silent", "build-console"], cwd=REPO, check=True, timeout=120)


@pytest.fixture(scope="module")
def console(built, tmp_path_factory):
    """A server with metrics (every job batch recorded on its own) behind Envoy."""
    metrics_port = free_port()
    server = ServerProcess(tmp_path_factory.mktemp("console"), mds_metrics_port=metrics_port, mds_job_commit_ms=0)
    server.start()
    envoy = EnvoyProcess(server, args=("--metrics", f"127.0.0.1:{metrics_port}"))
    yield server, envoy
    envoy.stop()
    assert server.stop() == 0


def run_browser(script: str, artefacts: Path, **env: str) -> None:
    """Runs one browser script with node's test runner; its output explains a failure."""
    shutil.rmtree(artefacts, ignore_errors=True)
    artefacts.mkdir(parents=True)
    result = subprocess.run(
        ["node", "--test", "--test-reporter=spec", script],
        cwd=BROWSER,
        env={**os.environ, "MDS_ARTEFACTS": str(artefacts), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_console_sources_type_check():
    result = subprocess.run(["npm", "run", "--silent", "check-console"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_serves_the_built_console_and_the_metrics(console):
    _, envoy = console
    redirect = requests.get(f"{envoy.url}/ui", allow_redirects=False)
    assert redirect.status_code == 301 and redirect.headers["location"].endswith("/ui/")
    page = requests.get(f"{envoy.url}/ui/")
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    # Every asset is local: the page names only its own files, and they are served.
    assets = re.findall(r'(?:src|href)="([^"#]+)"', page.text)
    assert sorted(assets) == ["console.css", "console.js"]
    for asset, content_type in (("console.js", "text/javascript"), ("console.css", "text/css")):
        served = requests.get(f"{envoy.url}/ui/{asset}")
        assert served.headers["content-type"] == content_type
        # No URL but the SVG namespace (a name, never fetched), so nothing loads from elsewhere.
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg\b)", served.text)
    assert "mds_requests_total" in requests.get(f"{envoy.url}/ui/metrics").text
    missing = requests.get(f"{envoy.url}/ui/nothing.js")
    assert missing.status_code == 404 and missing.text == "no such file"


def test_envoy_serves_metrics_only_when_told_which_server(console):
    """/ui/metrics has no API key check: a server's MDS_METRICS_PORT in Envoy's environment does not turn it on."""
    server, _ = console
    with mock.patch.dict(os.environ, {"MDS_METRICS_PORT": server.env["MDS_METRICS_PORT"]}):
        envoy = EnvoyProcess(server)
    try:
        off = requests.get(f"{envoy.url}/ui/metrics")
        assert off.status_code == 404 and "--metrics HOST:PORT" in off.text
    finally:
        envoy.stop()


def test_console_in_chromium(console, tmp_path):
    server, envoy = console
    model = onnx_models.dense()
    (tmp_path / "model.onnx").write_bytes(model)
    onnx_models.save_with_external_data(tmp_path / "external")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    scores, label = ort.InferenceSession(model).run(None, {"x": x})
    expected = {"x": x.tolist(), "scores": scores.tolist(), "label": label.tolist()}
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    big = rng.standard_normal((2000, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", big)
    # A job that runs for minutes (100,000 batches of one row, each recorded): the page cancels it.
    server.models.UploadModel(upload_requests("console-slow", model))
    slow_input = server.jobs.UploadJobInput(chunked_input(np.zeros((100_000, 8), np.float32), chunk_rows=50_000))
    slow = server.jobs.CreateJob(jobs_pb.CreateJobRequest(model="console-slow", input_id=slow_input.id, batch_rows=1))

    run_browser(
        "console.test.mjs",
        ARTEFACTS,
        MDS_URL=envoy.url,
        MDS_FIXTURES=str(tmp_path),
        MDS_MODEL_NAME="console-dense",
        MDS_SLOW_JOB=slow.id,
    )

    cancelled = server.jobs.GetJob(jobs_pb.GetJobRequest(id=slow.id))
    assert cancelled.state == jobs_pb.JOB_STATE_CANCELLED and cancelled.rows_done < 100_000
    uploaded = server.models.GetModel(models_pb.GetModelRequest(name="console-dense"))
    assert dict(uploaded.labels) == {"team": "console", "stage": "test"}
    listing = server.models.ListModels(models_pb.ListModelsRequest(name="console-dense-external"))
    assert not listing.models  # deleted from the page, after its upload with the side file
    summary = json.loads((ARTEFACTS / "summary.json").read_text())
    form_results = json.loads((ARTEFACTS / "form-job-results.json").read_text())
    assert form_results["outputs"]["scores"]["shape"] == [4, 3]
    np.testing.assert_allclose(np.float32(form_results["outputs"]["scores"]["values"]).reshape(4, 3), scores, rtol=1e-6)
    assert form_results["outputs"]["label"]["values"] == [str(v) for v in label]
    (big_scores, _) = ort.InferenceSession(model).run(None, {"x": big})
    np.testing.assert_allclose(np.load(ARTEFACTS / "npy-job-scores.npy"), big_scores, rtol=1e-6)
    for job in (summary["formJob"], summary["npyJob"]):
        assert summary["progress"][job][-1] == 100
    assert sorted(p.name for p in ARTEFACTS.glob("*.png"))[0] == "01-cancelled.png"


def test_console_with_api_keys(built, tmp_path):
    server = ServerProcess(tmp_path / "server", mds_auth="on").start()
    envoy = EnvoyProcess(server)
    try:
        _, key = create_key(server, "--scope", "admin")
        model = onnx_models.dense()
        server.models.UploadModel(
            upload_requests("console-secured", model), metadata=(("authorization", f"Bearer {key}"),)
        )
        (tmp_path / "model.onnx").write_bytes(model)
        run_browser(
            "console-auth.test.mjs", ARTEFACTS / "auth", MDS_URL=envoy.url, MDS_KEY=key, MDS_FIXTURES=str(tmp_path)
        )
    finally:
        envoy.stop()
        assert server.stop() == 0
