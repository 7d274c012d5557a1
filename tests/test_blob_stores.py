"""Every blob store passes the same tests: a local folder (embedded default) and S3 (MinIO here)."""

import hashlib
import http.server
import random
import threading
import uuid

import pytest

from mds_grpc.core.errors import Unavailable
from mds_grpc.storage.local_blobs import LocalBlobStore
from mds_grpc.storage.s3_blobs import PART_BYTES, S3BlobStore


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    env = request.getfixturevalue("services")
    return S3BlobStore(
        env["MDS_S3_ENDPOINT"],
        env["MDS_S3_ACCESS_KEY"],
        env["MDS_S3_SECRET_KEY"],
        bucket="test-" + uuid.uuid4().hex[:12],
    )


@pytest.fixture
def staged(tmp_path):
    path = tmp_path / "staged.bin"
    path.write_bytes(b"model bytes" * 1000)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_put_fetch_delete(store, tmp_path, staged):
    path, sha = staged
    assert not store.exists(sha)
    store.put_file(path, sha)
    store.put_file(path, sha)  # idempotent
    assert store.exists(sha)
    dest = tmp_path / "out" / "model.onnx"
    dest.parent.mkdir()
    store.fetch_to(sha, dest)
    assert dest.read_bytes() == path.read_bytes()
    store.delete(sha)
    store.delete(sha)  # a missing blob is fine
    assert not store.exists(sha)


def test_fetching_a_missing_blob_fails(store, tmp_path):
    with pytest.raises(FileNotFoundError):
        store.fetch_to("0" * 64, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_local_blobs_are_read_only(tmp_path, staged):
    path, sha = staged
    LocalBlobStore(tmp_path / "blobs").put_file(path, sha)
    assert oct((tmp_path / "blobs" / "sha256" / sha[:2] / sha).stat().st_mode & 0o777) == "0o444"


def test_s3_streaming_upload_commits_under_its_hash_or_leaves_nothing(services, tmp_path, staged):
    store = S3BlobStore(
        services["MDS_S3_ENDPOINT"],
        services["MDS_S3_ACCESS_KEY"],
        services["MDS_S3_SECRET_KEY"],
        bucket="test-" + uuid.uuid4().hex[:12],
    )
    path, sha = staged
    data = path.read_bytes()

    def stream():
        upload = store.open_upload()
        for offset in range(0, len(data), 1000):
            upload.write(data[offset : offset + 1000])
        return upload

    abandoned = stream()
    abandoned.abort()
    committed = stream()
    assert committed.commit(sha) is True
    committed.abort()  # harmless after commit
    assert stream().commit(sha) is False  # already there: content-addressed
    objects = [o.object_name for o in store.client.list_objects(store.bucket, recursive=True)]
    assert objects == [f"sha256/{sha}"]
    store.fetch_to(sha, tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data


def test_s3_streaming_upload_of_several_parts(services, tmp_path):
    """A file of three parts arrives whole; one abandoned after a part was sent leaves no object."""
    store = S3BlobStore(
        services["MDS_S3_ENDPOINT"],
        services["MDS_S3_ACCESS_KEY"],
        services["MDS_S3_SECRET_KEY"],
        bucket="test-" + uuid.uuid4().hex[:12],
    )
    data = random.Random(0).randbytes(2 * PART_BYTES + 5)
    sha = hashlib.sha256(data).hexdigest()
    abandoned = store.open_upload()
    abandoned.write(data[: PART_BYTES + 1])
    abandoned.abort()
    upload = store.open_upload()
    for offset in range(0, len(data), 3 << 20):  # pieces that straddle the parts' boundaries
        upload.write(data[offset : offset + (3 << 20)])
    assert upload.commit(sha) is True
    assert [o.object_name for o in store.client.list_objects(store.bucket, recursive=True)] == [f"sha256/{sha}"]
    store.fetch_to(sha, tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data


class _Refusing(http.server.BaseHTTPRequestHandler):
    """Answers 503 to every object request (the bucket exists), with an S3 XML error or a plain body."""

    xml = True

    def _answer(self) -> None:
        if self.path.rstrip("/") == "/refused" and self.command == "HEAD":
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = (
            b"<Error><Code>XMinioServerNotInitialized</Code><Message>starting</Message></Error>"
            if self.xml
            else b"starting"
        )
        self.send_response(503)
        self.send_header("Content-Type", "application/xml" if self.xml else "text/plain")
        self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET = do_PUT = do_POST = do_DELETE = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("xml", [True, False])
def test_s3_answering_503_is_unavailable(tmp_path, staged, xml):
    """MinIO answers 503 for moments while it starts or stops; this endpoint always does, so the case is certain."""
    handler = type("Refusing", (_Refusing,), {"xml": xml})
    endpoint = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=endpoint.serve_forever, daemon=True).start()
    try:
        store = S3BlobStore(f"127.0.0.1:{endpoint.server_port}", "key", "secret", bucket="refused", region="us-east-1")
        path, sha = staged
        for call in (
            lambda: store.exists(sha),
            lambda: store.put_file(path, sha),
            lambda: store.delete(sha),
            lambda: store.fetch_to(sha, tmp_path / "x"),
            lambda: store.open_upload().commit(sha),
        ):
            with pytest.raises(Unavailable, match="object store at 127.0.0.1"):
                call()
    finally:
        endpoint.shutdown()
