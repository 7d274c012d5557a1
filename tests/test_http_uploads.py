"""Models and job inputs uploaded over plain HTTP through a real Envoy, streamed (a file body, or multipart as
curl and browsers send it), and job outputs downloaded as .npy files."""

import base64
import hashlib
import io
import json
import socket
import subprocess
import tempfile

import numpy as np
import onnxruntime as ort
import pytest
import requests

import onnx_models
from harness import EnvoyProcess, ServerProcess, create_key, wait_until

HEADER = {"Content-Type": "application/octet-stream"}


@pytest.fixture(scope="module")
def envoy(server):
    process = EnvoyProcess(server)
    yield process
    process.stop()


def curl(*args: str) -> dict:
    """curl's JSON reply (curl as a user runs it: no client library)."""
    out = subprocess.run(["curl", "-sS", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def npy(array: np.ndarray) -> bytes:
    handle = io.BytesIO()
    np.save(handle, array)
    return handle.getvalue()


def predict(envoy, model: str, name: str, x: np.ndarray) -> np.ndarray:
    body = {"inputs": [{"name": name, "dtype": "DATA_TYPE_FP32", "shape": list(x.shape), "rawData": _b64(x)}]}
    reply = requests.post(f"{envoy.url}/v1/models/{model}:predict", json=body)
    assert reply.status_code == 200, reply.text
    (output,) = reply.json()["outputs"]
    return np.frombuffer(_unb64(output["rawData"]), "<f4").reshape([int(d) for d in output["shape"]])


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(array.astype("<f4").tobytes()).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def assert_error(reply: requests.Response, status: int, *fragments: str) -> None:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    for fragment in fragments:
        assert fragment in reply.json()["message"], reply.json()


@pytest.mark.usefixtures("nothing_left")
def test_a_plain_onnx_body_with_curl(envoy, unique, tmp_path):
    data = onnx_models.dense()
    (tmp_path / "m.onnx").write_bytes(data)
    model = curl(
        "--data-binary",
        f"@{tmp_path / 'm.onnx'}",
        "-H",
        "Content-Type: application/octet-stream",
        f"{envoy.url}/v1/models/{unique}:upload?description=from%20curl&sha256={hashlib.sha256(data).hexdigest()}",
    )
    assert (model["name"], model["version"], model["description"]) == (unique, "1", "from curl")
    assert model["sha256"] == hashlib.sha256(data).hexdigest() and model["sizeBytes"] == str(len(data))
    x = np.ones((2, 8), np.float32)
    want = ort.InferenceSession(data).run(["scores"], {"x": x})[0]
    reply = requests.post(
        f"{envoy.url}/v1/models/{unique}:predict",
        json={
            "inputs": [{"name": "x", "dtype": "DATA_TYPE_FP32", "shape": [2, 8], "rawData": _b64(x)}],
            "outputNames": ["scores"],
        },
    ).json()
    np.testing.assert_array_equal(np.frombuffer(_unb64(reply["outputs"][0]["rawData"]), "<f4").reshape(2, 3), want)
    requests.delete(f"{envoy.url}/v1/models/{unique}")


@pytest.mark.parametrize("header_first", [False, True])
def test_multipart_with_external_data_and_a_header_before_or_after_the_files(envoy, unique, tmp_path, header_first):
    path = onnx_models.save_with_external_data(tmp_path)
    header = ["-F", 'header={"labels":{"team":"vision"},"description":"two files"}']
    files = ["-F", f"model=@{path}", "-F", f"model.onnx.data=@{tmp_path / 'model.onnx.data'}"]
    model = curl(*(header + files if header_first else files + header), f"{envoy.url}/v1/models/{unique}:upload")
    assert (model["labels"], model["description"]) == ({"team": "vision"}, "two files")
    assert [(f["path"], f["sizeBytes"]) for f in model["files"]] == [
        ("model.onnx", str(path.stat().st_size)),
        ("model.onnx.data", str((tmp_path / "model.onnx.data").stat().st_size)),
    ]
    x = np.arange(2 * 64, dtype=np.float32).reshape(2, 64)
    want = ort.InferenceSession(str(path)).run(["y"], {"x": x})[0]
    np.testing.assert_allclose(predict(envoy, unique, "x", x), want, rtol=1e-6)
    requests.delete(f"{envoy.url}/v1/models/{unique}")


def test_multipart_as_a_browser_sends_it(envoy, unique, tmp_path):
    """File names and per-part Content-Types, as a browser's FormData; declared side files are verified."""
    (tmp_path / "weights").mkdir()
    path = onnx_models.save_with_external_data(tmp_path, location="weights/w.bin")
    side = (tmp_path / "weights" / "w.bin").read_bytes()
    header = {"externalFiles": [{"path": "weights/w.bin", "sha256": hashlib.sha256(side).hexdigest()}]}
    reply = requests.post(
        f"{envoy.url}/v1/models/{unique}:upload",
        files=[
            ("model", ("my model.onnx", path.read_bytes(), "application/octet-stream")),
            ("weights/w.bin", ("w.bin", side, "application/octet-stream")),
            ("header", ("blob", json.dumps(header), "application/json")),
        ],
    )
    assert reply.status_code == 200, reply.text
    assert [f["path"] for f in reply.json()["files"]] == ["model.onnx", "weights/w.bin"]
    requests.delete(f"{envoy.url}/v1/models/{unique}")


def test_a_browser_posts_form_data_with_fetch(envoy, unique, tmp_path):
    """Chromium's own multipart body: FormData with a JSON header first and the model as a Blob."""
    page = tmp_path / "upload.html"
    page.write_text(
        f"""<script>
        const model = Uint8Array.from(atob("{base64.b64encode(onnx_models.dense()).decode()}"), c => c.charCodeAt(0));
        const form = new FormData();
        form.append("header", JSON.stringify({{labels: {{via: "browser"}}}}));
        form.append("model", new Blob([model]), "classifier.onnx");
        fetch("{envoy.url}/v1/models/{unique}:upload", {{method: "POST", body: form}})
          .then(reply => reply.text()).then(text => {{ document.body.textContent = text; }});
        </script>"""
    )
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}"]
            + ["--disable-web-security", "--virtual-time-budget=20000", "--dump-dom", page.as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    model = json.loads(dom.split("<body>")[1].split("</body>")[0])
    assert (model["name"], model["labels"]) == (unique, {"via": "browser"})
    requests.delete(f"{envoy.url}/v1/models/{unique}")


@pytest.mark.usefixtures("nothing_left")
@pytest.mark.parametrize(
    "parts, query, status, fragment",
    [
        ([("model", b"not a model")], "", 400, "not an ONNX model"),
        ([("header", b'{"labels": 3}')], "", 400, "is not a ModelHeader in JSON"),
        ([("header", b"\xff{}")], "", 400, "is not a ModelHeader in JSON"),
        ([("header", b'{"name": "other"}'), ("model", onnx_models.dense())], "", 400, "names model 'other'"),
        ([("model", onnx_models.dense()), ("header", b"{}")], "?description=x", 400, "not both"),
        ([("model", onnx_models.dense()), ("model", onnx_models.dense())], "", 400, "two multipart parts"),
        ([("a/../b", b"x"), ("model", onnx_models.dense())], "", 400, "invalid file path"),
        ([("header", b"{}")], "", 400, "no bytes received for file 'model.onnx'"),
        (
            [("header", b'{"externalFiles": [{"path": "w.bin"}]}'), ("model", onnx_models.dense())],
            "",
            400,
            "no bytes received for file 'w.bin'",
        ),
        (
            [("model", onnx_models.dense()), ("header", b'{"sha256": "' + b"0" * 64 + b'"}')],
            "",
            400,
            "sha256 mismatch for 'model.onnx'",
        ),
        (
            [("model", onnx_models.dense()), ("header", b'{"placement": {"executionProviders": ["cuda"]}}')],
            "",
            400,
            "this server has no cuda execution provider",
        ),
    ],
)
def test_multipart_errors_store_nothing(envoy, unique, parts, query, status, fragment):
    reply = requests.post(
        f"{envoy.url}/v1/models/{unique}:upload{query}", files=[(name, ("f", data)) for name, data in parts]
    )
    assert_error(reply, status, fragment)


@pytest.mark.usefixtures("nothing_left")
@pytest.mark.parametrize(
    "content_type, body, fragment",
    [
        ("multipart/form-data", b"--x\r\n", "needs a boundary"),
        ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="model"\r\n\r\nabc', "ends"),
        (
            "multipart/form-data; boundary=x",
            b"--x\r\nContent-Disposition: form-data\r\n\r\nabc\r\n--x--\r\n",
            "no name",
        ),
        ("multipart/form-data; boundary=x", b"garbage", "malformed multipart"),
        ("multipart/form-data; boundary=" + "b" * 300, b"--" + b"b" * 300 + b"\r\n", "exceeds maximum of 256"),
    ],
)
def test_malformed_multipart_bodies(envoy, unique, content_type, body, fragment):
    reply = requests.post(f"{envoy.url}/v1/models/{unique}:upload", data=body, headers={"Content-Type": content_type})
    assert_error(reply, 400, fragment)


def cut_off(envoy, server, path: str, content_type: str, head: bytes, total: int) -> None:
    """Send `head` of a body announced as `total` bytes, wait until the server is receiving it, then hang up."""
    with socket.create_connection(("127.0.0.1", envoy.port)) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: mds\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {total}\r\n\r\n".encode()
            + head
        )
        wait_until(lambda: any(p.name.startswith("upload-") for p in server.leftovers()), what="the upload to start")


@pytest.mark.usefixtures("nothing_left")
def test_a_cut_off_plain_upload_leaves_nothing(envoy, server, unique):
    cut_off(envoy, server, f"/v1/models/{unique}:upload", "application/octet-stream", b"\0" * (3 << 20), 50 << 20)


@pytest.mark.usefixtures("nothing_left")
def test_a_cut_off_multipart_upload_leaves_nothing(envoy, server, unique):
    head = (
        b'--b\r\nContent-Disposition: form-data; name="model"; filename="m.onnx"\r\n\r\n'
        + onnx_models.dense()
        + b'\r\n--b\r\nContent-Disposition: form-data; name="model.onnx.data"\r\n\r\n'
        + b"\1" * (3 << 20)
    )
    cut_off(envoy, server, f"/v1/models/{unique}:upload", "multipart/form-data; boundary=b", head, 50 << 20)
    wait_until(lambda: not server.leftovers(), what="the server to clean up")
    assert requests.get(f"{envoy.url}/v1/models/{unique}").status_code == 404


@pytest.fixture(scope="module")
def small_envoy(tmp_path_factory):
    server = ServerProcess(
        tmp_path_factory.mktemp("small"),
        mds_max_model_bytes=1000,
        mds_max_job_input_bytes=1000,
        mds_max_inputs=2,
        mds_max_rank=3,
        mds_max_model_files=2,
    )
    server.start()
    envoy = EnvoyProcess(server)
    yield envoy, server
    envoy.stop()
    assert server.stop() == 0


@pytest.mark.parametrize("multipart", [False, True])
def test_over_the_size_limit_is_429_and_leaves_nothing(small_envoy, multipart):
    envoy, server = small_envoy
    big = onnx_models.dense(features=64, classes=16)
    if multipart:
        reply = requests.post(f"{envoy.url}/v1/models/big:upload", files={"model": ("m.onnx", big)})
    else:
        reply = requests.post(f"{envoy.url}/v1/models/big:upload", data=big, headers=HEADER)
    assert_error(reply, 429, "model size limit of 1000 bytes")
    rows = requests.post(f"{envoy.url}/v1/jobInputs:upload?input=x", data=npy(np.zeros((100, 8), np.float32)))
    assert_error(rows, 429, "exceeds the server's limit of 1000 bytes")
    wait_until(lambda: not server.leftovers(), what="the server to clean up")
    assert server.blobs() == []


def test_tensor_and_file_count_limits_hold_over_http(small_envoy):
    envoy, server = small_envoy
    url = f"{envoy.url}/v1/jobInputs:upload"
    three = [(name, (f"{name}.npy", npy(np.zeros(0, np.float32)))) for name in "abc"]
    assert_error(requests.post(url, files=three), 429, "3 input tensors exceed the limit of 2 (MDS_MAX_INPUTS)")
    deep = npy(np.zeros((1, 1, 1, 1), np.float32))
    assert_error(requests.post(f"{url}?input=x", data=deep), 429, "rank 4, over the limit of 3 (MDS_MAX_RANK)")
    files = [("model", ("m.onnx", b"x"))] + [(f"w{i}.bin", ("w", b"1")) for i in range(3)]
    reply = requests.post(f"{envoy.url}/v1/models/many:upload", files=files)
    assert_error(reply, 429, "at most 2 side files (MDS_MAX_MODEL_FILES); 'w2.bin' would be one more")
    wait_until(lambda: not server.leftovers(), what="the server to clean up")
    assert server.blobs() == []


def test_rows_of_varying_shape_refuse_an_npy_download(small_envoy):
    envoy, _ = small_envoy
    requests.post(f"{envoy.url}/v1/models/outer:upload", data=onnx_models.outer_product(), headers=HEADER)
    rows = requests.post(f"{envoy.url}/v1/jobInputs:upload?input=x", data=npy(np.ones((10, 1), np.float32)))
    # Batches of 5 rows of 5 elements twice; of 4 rows of 4 elements twice, then 2 of 2 (a result of its own).
    for batch_rows, status in ((5, 200), (4, 400)):
        body = {"model": "outer", "inputId": rows.json()["id"], "batchRows": batch_rows}
        job = requests.post(f"{envoy.url}/v1/jobs", json=body).json()
        assert requests.get(f"{envoy.url}/v1/jobs/{job['id']}:watch").json()[-1]["state"] == "JOB_STATE_SUCCEEDED"
        download = requests.get(f"{envoy.url}/v1/jobs/{job['id']}/results?format=npy&output=y")
        if status == 200:
            np.testing.assert_array_equal(np.load(io.BytesIO(download.content)), np.ones((10, 5), np.float32))
        else:
            assert_error(download, 400, "output 'y' has rows of varying shape", "use GetJobResults")
    requests.delete(f"{envoy.url}/v1/models/outer")


def test_job_inputs_as_npy_then_results_as_npy(envoy, unique):
    requests.post(f"{envoy.url}/v1/models/{unique}:upload", data=onnx_models.add_two(2.0), headers=HEADER)
    a = np.arange(30, dtype=np.float32)
    b = np.arange(30, dtype=">f4") * 10  # big-endian, as some writers save
    reply = requests.post(
        f"{envoy.url}/v1/jobInputs:upload", files=[("a", ("a.npy", npy(a))), ("b", ("b.npy", npy(b)))]
    )
    assert reply.status_code == 200, reply.text
    job_input = reply.json()
    assert (job_input["rows"], [i["name"] for i in job_input["inputs"]]) == ("30", ["a", "b"])
    job = requests.post(
        f"{envoy.url}/v1/jobs", json={"model": unique, "inputId": job_input["id"], "batchRows": 7}
    ).json()
    assert requests.get(f"{envoy.url}/v1/jobs/{job['id']}:watch").json()[-1]["state"] == "JOB_STATE_SUCCEEDED"
    download = requests.get(f"{envoy.url}/v1/jobs/{job['id']}/results", params={"format": "npy", "output": "z"})
    assert download.status_code == 200 and download.headers["content-type"] == "application/octet-stream"
    np.testing.assert_array_equal(np.load(io.BytesIO(download.content)), 2.0 * (a + b.astype(np.float32)))
    # Without format=npy the same path still answers GetJobResults' JSON.
    assert sum(int(batch["rows"]) for batch in requests.get(f"{envoy.url}/v1/jobs/{job['id']}/results").json()) == 30
    unknown = requests.get(f"{envoy.url}/v1/jobs/{job['id']}/results", params={"format": "npy", "output": "q"})
    assert_error(unknown, 400, "name one of the job's outputs ['z']")
    csv = requests.get(f"{envoy.url}/v1/jobs/{job['id']}/results", params={"format": "csv", "output": "z"})
    assert_error(csv, 400, "format 'csv' is not supported; use format=npy")
    assert_error(requests.get(f"{envoy.url}/v1/jobs/nope/results?format=npy&output=z"), 404, "'nope' does not exist")
    requests.delete(f"{envoy.url}/v1/models/{unique}")


def test_one_npy_body_with_curl(envoy, unique, tmp_path):
    requests.post(f"{envoy.url}/v1/models/{unique}:upload", data=onnx_models.dense(), headers=HEADER)
    x = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)
    (tmp_path / "x.npy").write_bytes(npy(x))
    job_input = curl("--data-binary", f"@{tmp_path / 'x.npy'}", f"{envoy.url}/v1/jobInputs:upload?input=x")
    assert job_input["inputs"] == [{"name": "x", "dtype": "DATA_TYPE_FP32", "shape": ["50", "8"]}]
    job = requests.post(f"{envoy.url}/v1/jobs", json={"model": unique, "inputId": job_input["id"]}).json()
    assert requests.get(f"{envoy.url}/v1/jobs/{job['id']}:watch").json()[-1]["state"] == "JOB_STATE_SUCCEEDED"
    subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            str(tmp_path / "scores.npy"),
            f"{envoy.url}/v1/jobs/{job['id']}/results?format=npy&output=scores",
        ],
        check=True,
    )
    want = ort.InferenceSession(onnx_models.dense()).run(["scores"], {"x": x})[0]
    np.testing.assert_allclose(np.load(tmp_path / "scores.npy"), want, rtol=1e-6)
    requests.delete(f"{envoy.url}/v1/models/{unique}")


def test_a_job_of_no_rows_downloads_an_empty_array(envoy, unique):
    requests.post(f"{envoy.url}/v1/models/{unique}:upload", data=onnx_models.dense(), headers=HEADER)
    job_input = requests.post(f"{envoy.url}/v1/jobInputs:upload?input=x", data=npy(np.zeros((0, 8), np.float32)))
    job = requests.post(f"{envoy.url}/v1/jobs", json={"model": unique, "inputId": job_input.json()["id"]}).json()
    assert requests.get(f"{envoy.url}/v1/jobs/{job['id']}:watch").json()[-1]["state"] == "JOB_STATE_SUCCEEDED"
    requests.delete(f"{envoy.url}/v1/models/{unique}")  # the job keeps its outputs' dtypes and shapes
    download = requests.get(f"{envoy.url}/v1/jobs/{job['id']}/results?format=npy&output=scores")
    empty = np.load(io.BytesIO(download.content))
    assert (empty.dtype, empty.shape) == (np.float32, (0, 3))


@pytest.mark.usefixtures("nothing_left")
@pytest.mark.parametrize(
    "query, body, fragment",
    [
        ("", npy(np.zeros(3, np.float32)), "name the input this .npy body holds"),
        ("?input=x", b"PK\3\4 not npy", "is not an .npy file"),
        ("?input=x", npy(np.zeros(3, np.float32))[:20], "ends before its .npy header"),
        ("?input=x", npy(np.zeros((4, 3), np.float32))[:-4], "received 3 rows, the header declared 4"),
        ("?input=x", npy(np.asfortranarray(np.zeros((4, 3), np.float32))), "Fortran order"),
        ("?input=x", npy(np.array(["a", "b"])), "jobs take numeric and boolean arrays"),
        ("?input=x", npy(np.zeros(3, np.float32)) + b"\0" * 4, "more data than its shape"),
        ("?input=x", npy(np.float32(1)), "needs a full shape with rows first"),
        ("?input=x", b"\x93NUMPY\x02\x00\xff\xff\xff\x7f{", "an .npy header of 2147483647 bytes"),
        ("?input=x", b"\x93NUMPY\x02\x00\x11\x27\x00\x00{", "an .npy header of 10001 bytes; at most 10000"),
    ],
)
def test_job_input_errors(envoy, query, body, fragment):
    assert_error(requests.post(f"{envoy.url}/v1/jobInputs:upload{query}", data=body, headers=HEADER), 400, fragment)


@pytest.mark.usefixtures("nothing_left")
def test_multipart_job_input_errors(envoy):
    url = f"{envoy.url}/v1/jobInputs:upload"
    two = [("a", ("a.npy", npy(np.zeros(3, np.float32)))), ("b", ("b.npy", npy(np.zeros(4, np.float32))))]
    assert_error(requests.post(url, files=two), 400, "same number of rows")
    same = [("a", ("a.npy", npy(np.zeros(3, np.float32))))] * 2
    assert_error(requests.post(url, files=same), 400, "two multipart parts are named 'a'")
    assert_error(requests.post(url + "?input=a", files=same[:1]), 400, "drop the `input` query parameter")


def test_uploads_need_the_admin_scope(tmp_path):
    server = ServerProcess(tmp_path, mds_auth="on")
    _, admin = create_key(server, "--scope", "admin")
    _, limited = create_key(server, "--scope", "predict")
    server.start()
    envoy = EnvoyProcess(server)
    try:
        url = f"{envoy.url}/v1/models/keyed:upload"
        assert_error(requests.post(url, data=onnx_models.dense(), headers=HEADER), 401, "API key")
        bearer = lambda key: {**HEADER, "Authorization": f"Bearer {key}"}  # noqa: E731
        assert_error(requests.post(url, data=onnx_models.dense(), headers=bearer(limited)), 403, "admin")
        assert requests.post(url, data=onnx_models.dense(), headers=bearer(admin)).json()["version"] == "1"
        rows = requests.post(
            f"{envoy.url}/v1/jobInputs:upload?input=x", data=npy(np.ones((2, 8), np.float32)), headers=bearer(limited)
        )
        assert rows.json()["rows"] == "2"
    finally:
        envoy.stop()
        assert server.stop() == 0
