"""Browsers call MDS over gRPC-Web through Envoy: connect-web from Node and from a page in headless Chromium on
another origin (tests/browser/grpc_web.test.mjs), running the module docs/browsers.md shows; CORS preflights for
allowed origins and others; uploads and WebSockets refused from origins neither allowed nor Envoy's own."""

import json
import os
import re
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.typing import Origin

import onnx_models
from harness import DENSE, REPO, EnvoyProcess, ServerProcess, create_key, in_process, upload_requests

BROWSER = Path(__file__).parent / "browser"
JOB_ROWS, BATCH_ROWS = 200, 1  # a job of 200 batches, each recorded on its own: progress comes in many steps
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type,x-grpc-web"}


def snippet_module(folder: Path) -> Path:
    """docs/browsers.md's mds.js, written next to links to gen/ and node_modules/ so that its imports resolve."""
    block = re.search(r"```js\n(// mds\.js: .*?)```", (REPO / "docs" / "browsers.md").read_text(), re.DOTALL)
    assert block, "docs/browsers.md shows mds.js"
    for name in ("gen", "node_modules"):
        (folder / name).symlink_to(REPO / name)
    (folder / "mds.js").write_text(block.group(1))
    return folder / "mds.js"


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def snippet(tmp_path_factory) -> Path:
    return snippet_module(tmp_path_factory.mktemp("snippet"))


@pytest.fixture(scope="module")
def pages(tmp_path_factory, snippet):
    """The test page (bundled with esbuild) from two web servers: two origins other than Envoy's."""
    site = tmp_path_factory.mktemp("page")
    (site / "index.html").write_text(
        '<!doctype html><title>MDS gRPC-Web</title><script type="module" src="page.js"></script>'
    )
    subprocess.run(
        [REPO / "node_modules" / ".bin" / "esbuild", BROWSER / "grpc_web_page.mjs", "--bundle", "--format=esm"]
        + [f"--alias:mds-web-snippet={snippet}", f"--outfile={site / 'page.js'}", "--log-level=warning"],
        check=True,
    )
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=site)) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield [f"http://127.0.0.1:{server.server_port}" for server in servers]
    for server in servers:
        server.shutdown()


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A server with API keys on, recording every job batch on its own, and an admin key."""
    server = ServerProcess(tmp_path_factory.mktemp("grpc-web"), mds_auth="on", mds_job_commit_ms=0).start()
    yield server, create_key(server, "--scope", "admin")[1]
    assert server.stop() == 0


@pytest.fixture(scope="module")
def envoy(secured, pages):
    """Envoy allowing the first page origin only."""
    process = EnvoyProcess(secured[0], cors_origins=(pages[0],))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def fixtures(secured, tmp_path_factory) -> Path:
    """Per caller: a model with two versions, rows to predict and a job's rows, with onnxruntime's outputs."""
    server, key = secured
    rng = np.random.default_rng(14)
    callers = {}
    for caller in ("node", "page"):
        model = f"grpc-web-{caller}"
        for name, data in ((model, DENSE), (model, DENSE), (f"{model}-adder", onnx_models.add_two())):
            server.models.UploadModel(upload_requests(name, data), metadata=(("authorization", f"Bearer {key}"),))
        x = rng.standard_normal((4, 8)).astype(np.float32)
        job_x = rng.standard_normal((JOB_ROWS, 8)).astype(np.float32)
        predicted, job = in_process(DENSE, x, len(x)), in_process(DENSE, job_x, BATCH_ROWS)
        callers[caller] = {
            "model": model,
            "adder": f"{model}-adder",
            "features": 8,
            "x": x.ravel().tolist(),
            "scores": predicted["scores"].ravel().tolist(),
            "label": predicted["label"].ravel().tolist(),
            "jobX": job_x.ravel().tolist(),
            "batchRows": BATCH_ROWS,
            "jobScores": job["scores"].ravel().tolist(),
            "jobLabel": job["label"].ravel().tolist(),
        }
    path = tmp_path_factory.mktemp("fixtures") / "fixtures.json"
    path.write_text(json.dumps(callers))
    return path


def node_test(name: str, envoy, secured, pages, snippet, fixtures) -> None:
    env = {
        "MDS_ENVOY_URL": envoy.url,
        "MDS_API_KEY": secured[1],
        "MDS_SNIPPET": str(snippet),
        "MDS_FIXTURES": str(fixtures),
        "MDS_PAGE_ALLOWED": pages[0],
        "MDS_PAGE_REFUSED": pages[1],
    }
    command = ["node", "--test", f"--test-name-pattern={name}", "grpc_web.test.mjs"]
    result = subprocess.run(
        command, cwd=BROWSER, env={**os.environ, **env}, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and "# pass 1" in result.stdout, result.stdout + result.stderr


def test_grpc_web_from_node(envoy, secured, pages, snippet, fixtures):
    node_test("from Node", envoy, secured, pages, snippet, fixtures)


def test_grpc_web_from_a_page_on_an_allowed_origin_and_not_from_others(envoy, secured, pages, snippet, fixtures):
    node_test("from a page in Chromium", envoy, secured, pages, snippet, fixtures)


def test_preflight_allows_configured_origins_only(envoy, pages):
    url = envoy.url + "/mds.v1.JobService/WatchJob"
    allowed = requests.options(url, headers={"Origin": pages[0], **PREFLIGHT})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == pages[0]
    assert allowed.headers["access-control-allow-headers"].split(", ") == [
        "authorization",
        "content-type",
        "x-grpc-web",
        "x-user-agent",
        "grpc-timeout",
    ]
    assert allowed.headers["access-control-expose-headers"] == "grpc-status, grpc-message, grpc-status-details-bin"
    for other in (pages[1], pages[0] + ".example.com", "null"):
        refused = requests.options(url, headers={"Origin": other, **PREFLIGHT})
        assert refused.status_code == 200 and "access-control-allow-origin" not in refused.headers


def test_changes_from_another_origin_are_refused_unless_it_is_allowed(envoy, secured, pages):
    """A page elsewhere can post a form (an upload) or open a WebSocket without a preflight: Envoy refuses both
    when the Origin is neither Envoy's own nor allowed. Without an Origin (gRPC, curl), and for reads, all pass."""
    key = {"authorization": f"Bearer {secured[1]}"}

    def upload(origin: str | None) -> requests.Response:
        headers = {**key, **({"Origin": origin} if origin else {})}
        form = {"model": ("model.onnx", DENSE)}
        return requests.post(f"{envoy.url}/v1/models/cross-origin:upload", headers=headers, files=form)

    for foreign in (pages[1], "null"):
        refused = upload(foreign)
        assert refused.status_code == 403, refused.text
        assert refused.text == f"cross-origin request refused: {foreign} is not an allowed origin"
        assert requests.get(f"{envoy.url}/v1/models", headers={**key, "Origin": foreign}).status_code == 200
    versions = [upload(origin).json()["version"] for origin in (None, pages[0], envoy.url)]
    assert versions == ["1", "2", "3"]  # nothing was made by the refused ones

    socket = envoy.url.replace("http://", "ws://") + "/v1/predictions:ws"
    with pytest.raises(InvalidStatus) as refused_socket:
        connect(socket, origin=Origin(pages[1]), additional_headers=key)
    assert refused_socket.value.response.status_code == 403
    for origin in (envoy.url, pages[0]):
        with connect(socket, origin=Origin(origin), additional_headers=key) as accepted:
            assert accepted.protocol.state.name == "OPEN"


def test_no_origin_is_allowed_by_default(secured, pages):
    envoy = EnvoyProcess(secured[0])
    try:
        preflight = requests.options(
            envoy.url + "/mds.v1.ModelService/ListModels", headers={"Origin": pages[0], **PREFLIGHT}
        )
        assert preflight.status_code == 200 and "access-control-allow-origin" not in preflight.headers
    finally:
        envoy.stop()


@pytest.mark.parametrize("origin", ["*", "https://*.example.com", "https://app.example.com/", "app.example.com"])
def test_run_envoy_accepts_exact_origins_only(origin, tmp_path):
    run_envoy = [sys.executable, REPO / "scripts" / "run_envoy.py", "--config-out", tmp_path / "envoy.yaml"]
    for args, env in ((["--cors-origin", origin], {}), ([], {"MDS_CORS_ORIGINS": f"http://localhost:3000,{origin}"})):
        done = subprocess.run(run_envoy + args, env={**os.environ, **env}, capture_output=True, text=True)
        assert done.returncode == 2 and "is not an origin like https://app.example.com" in done.stderr, done.stderr
