"""`mds gc` removes what failures leave behind and nothing else; a killed upload leaves nothing listed."""

import hashlib
import io
import os
import signal
import threading

import grpc

import onnx_models
from harness import (
    ONE,
    ServerProcess,
    assert_status,
    deploy,
    mds_gc,
    outputs_of,
    request,
    storage_of,
    upload_requests,
    wait_until,
)
from mds.v1 import model_service_pb2 as pb


def test_gc_removes_only_orphans(server, unique, tmp_path):
    deploy(server, unique, onnx_models.add_two(4.0))
    storage = storage_of(server)
    orphan = tmp_path / "orphan"
    orphan.write_bytes(os.urandom(100))
    sha = hashlib.sha256(orphan.read_bytes()).hexdigest()
    storage.blobs.put_file(orphan, sha)
    if "MDS_S3_ENDPOINT" in server.env:  # uploads no link names, and one an older version never copied
        storage.blobs.client.put_object(storage.blobs.bucket, "uploads/unlinked", io.BytesIO(b"x"), 1)
        storage.blobs.client.put_object(storage.blobs.bucket, "incoming/abandoned", io.BytesIO(b"x"), 1)
    before = set(server.blobs())
    report = mds_gc(server)
    assert report["orphan_blobs"] == [sha]
    assert set(server.blobs()) == before - {sha} - {"abandoned", "unlinked"}
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
