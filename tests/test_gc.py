"""`mds gc` removes what failures leave behind and nothing else; a killed upload leaves nothing listed."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading


import onnx_models
from harness import ServerProcess, upload_requests, wait_until
from test_predict import ONE, deploy, outputs_of, request
from test_upload import assert_status

import grpc
from mds.v1 import model_service_pb2 as pb
from mds_grpc.config import load_settings
from mds_grpc.storage import open_storage


def storage_of(server: ServerProcess):
    env = {k.removeprefix("MDS_").lower(): v for k, v in server.env.items()
           if k in ("MDS_MONGO_URI", "MDS_MONGO_DATABASE", "MDS_S3_ENDPOINT", "MDS_S3_ACCESS_KEY",
                    "MDS_S3_SECRET_KEY", "MDS_S3_BUCKET")}
    return open_storage(load_settings(data_dir=server.data_dir, **env))


def mds_gc(server: ServerProcess) -> dict:
    result = subprocess.run([sys.executable, "-m", "mds_grpc", "gc", "--grace-seconds", "-60",
                             "--data-dir", str(server.data_dir), "--log-dir", str(server.root / "gc-logs")],
                            env={**os.environ, **server.env}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_gc_removes_only_orphans(server, unique, tmp_path):
    deploy(server, unique, onnx_models.add_two(4.0))
    storage = storage_of(server)
    orphan = tmp_path / "orphan"
    orphan.write_bytes(os.urandom(100))
    sha = hashlib.sha256(orphan.read_bytes()).hexdigest()
    storage.blobs.put_file(orphan, sha)
    if "MDS_S3_ENDPOINT" in server.env:  # an upload that completed but was never published
        storage.blobs.client.put_object(storage.blobs.bucket, "incoming/abandoned", io.BytesIO(b"x"), 1)
    before = set(server.blobs())
    report = mds_gc(server)
    assert report["orphan_blobs"] == [sha]
    assert set(server.blobs()) == before - {sha} - {"abandoned"}
    assert outputs_of(server.inference.Predict(request(unique, {"a": ONE, "b": ONE})))["z"].tolist() == [8.0]
    assert mds_gc(server) == {"orphan_blobs": [], "partial_writes": []}


def test_sigkill_in_the_middle_of_an_upload_leaves_nothing(tmp_path):
    server = ServerProcess(tmp_path).start()
    release = threading.Event()

    def requests():
        yield from upload_requests("half", b"\x08" * 300_000, chunk_size=50_000)
        release.wait(60)

    call = server.models.UploadModel.future(requests())
    wait_until(lambda: any(p.is_file() for p in server.leftovers()), what="the upload to reach the server")
    server.stop(signal.SIGKILL)
    release.set()
    assert call.exception(timeout=30) is not None  # the upload never completed
    restarted = ServerProcess(tmp_path).start()
    try:
        assert not restarted.leftovers() and restarted.blobs() == []
        assert_status(lambda: restarted.models.GetModel(pb.GetModelRequest(name="half")), grpc.StatusCode.NOT_FOUND)
        assert mds_gc(restarted) == {"orphan_blobs": [], "partial_writes": []}
    finally:
        assert restarted.stop() == 0
