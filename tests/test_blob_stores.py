"""Every blob store passes the same tests: a local folder (embedded default) and S3 (MinIO here)."""

import hashlib
import http.server
import io
import random
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from mds_grpc.core.errors import Unavailable
from mds_grpc.storage.local_blobs import LocalBlobStore
from mds_grpc.storage.s3_blobs import PART_BUFFERS, PART_BYTES, S3BlobStore


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


@pytest.fixture
def s3_store(services):
    return S3BlobStore(
        services["MDS_S3_ENDPOINT"],
        services["MDS_S3_ACCESS_KEY"],
        services["MDS_S3_SECRET_KEY"],
        bucket="test-" + uuid.uuid4().hex[:12],
    )


def objects(store: S3BlobStore) -> dict[str, int]:
    """Every object in the bucket: its size."""
    return {o.object_name: o.size for o in store.client.list_objects(store.bucket, recursive=True)}


def multipart_uploads(store: S3BlobStore, upload) -> list:
    """The multipart uploads to `upload`'s key that were neither completed nor aborted."""
    return store.client._list_multipart_uploads(store.bucket, prefix=upload.key).uploads


def streamed(store: S3BlobStore, data: bytes, piece: int = 1000):
    upload = store.open_upload()
    for offset in range(0, len(data), piece):
        upload.write(data[offset : offset + piece])
    return upload


def test_s3_streaming_upload_is_linked_under_its_hash_not_copied(s3_store, tmp_path, staged, monkeypatch):
    """A committed upload stays at its own key, found by its hash through a link; no object is copied."""
    store = s3_store
    monkeypatch.setattr(store.client, "copy_object", None)  # any copy fails the test
    path, sha = staged
    data = path.read_bytes()
    abandoned = streamed(store, data)
    abandoned.close()
    abandoned.abort()
    assert objects(store) == {} and multipart_uploads(store, abandoned) == []
    committed = streamed(store, data)
    assert committed.commit(sha) is True
    committed.abort()  # harmless after commit
    again = streamed(store, data)
    assert again.commit(sha) is False  # already there: content-addressed, and the second copy never appeared
    assert multipart_uploads(store, again) == []
    assert objects(store) == {f"links/{sha}/{committed.id}": 0, f"uploads/{committed.id}": len(data)}
    assert store.exists(sha) and store.list_blobs(datetime.now(UTC) + timedelta(minutes=1)) == [sha]
    store.fetch_to(sha, tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data
    store.delete(sha)
    assert objects(store) == {} and not store.exists(sha)


def test_s3_streaming_upload_keeps_its_parts_in_flight_within_its_buffers(s3_store, tmp_path, monkeypatch):
    """Six parts and a tail, sent PART_BUFFERS at a time (no more buffers are made); the file arrives whole,
    and one abandoned after some parts were sent leaves no object and no multipart upload."""
    store = s3_store
    sending, most = 0, 0
    lock = threading.Lock()
    send_part = store.client._upload_part

    def slow_part(*args):
        nonlocal sending, most
        with lock:
            sending += 1
            most = max(most, sending)
        time.sleep(0.2)  # long enough for the writer to fill every buffer meanwhile
        try:
            return send_part(*args)
        finally:
            with lock:
                sending -= 1

    monkeypatch.setattr(store.client, "_upload_part", slow_part)
    data = random.Random(0).randbytes(6 * PART_BYTES + 5)
    sha = hashlib.sha256(data).hexdigest()
    abandoned = store.open_upload()
    abandoned.write(data[: 2 * PART_BYTES + 1])
    abandoned.abort()
    assert objects(store) == {} and multipart_uploads(store, abandoned) == []
    upload = streamed(store, data, 3 << 20)  # pieces that straddle the parts' boundaries
    upload.close()  # waits for every part: then no buffer is left
    assert upload._buffers == PART_BUFFERS and most == PART_BUFFERS
    assert all(part.done() for part in upload._sending) and upload._free.empty()
    assert upload.commit(sha) is True
    assert objects(store) == {f"links/{sha}/{upload.id}": 0, f"uploads/{upload.id}": len(data)}
    store.fetch_to(sha, tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data


def test_s3_link_is_written_before_the_upload_appears_and_removed_after_it(s3_store, staged, monkeypatch):
    """The order that lets sweep_partial and exists() trust a listing (the module's rules 1 and 2)."""
    store = s3_store
    path, sha = staged
    seen = []
    for name in ("_complete_multipart_upload", "remove_object"):
        call = getattr(store.client, name)

        def recorded(bucket, key, *args, call=call, name=name):
            seen.append((name, key, sorted(objects(store))))
            return call(bucket, key, *args)

        monkeypatch.setattr(store.client, name, recorded)
    upload = streamed(store, path.read_bytes())
    assert upload.commit(sha) is True
    link, data = f"links/{sha}/{upload.id}", f"uploads/{upload.id}"
    assert seen == [("_complete_multipart_upload", data, [link])]
    seen.clear()
    store.delete(sha)
    assert [(name, key) for name, key, _ in seen] == [
        ("remove_object", f"sha256/{sha}"),
        ("remove_object", data),
        ("remove_object", link),
    ]
    assert seen[2][2] == [link]  # the upload went first


def test_s3_sweep_removes_unlinked_uploads_only(s3_store, staged):
    """An upload without its link (and an older version's `incoming/` object) is swept; a linked one never,
    nor a link whose upload never appeared, which counts for nothing and goes with delete()."""
    store = s3_store
    path, sha = staged
    linked = streamed(store, path.read_bytes())
    assert linked.commit(sha) is True
    store.client.put_object(store.bucket, "uploads/unlinked", io.BytesIO(b"x"), 1)
    store.client.put_object(store.bucket, "incoming/abandoned", io.BytesIO(b"x"), 1)
    dangling = "f" * 64
    store.client.put_object(store.bucket, f"links/{dangling}/never-appeared", io.BytesIO(b""), 0)
    later = datetime.now(UTC) + timedelta(minutes=1)
    assert sorted(store.sweep_partial(later)) == ["incoming/abandoned", "uploads/unlinked"]
    assert store.sweep_partial(later) == []
    assert store.exists(sha) and not store.exists(dangling)
    assert store.list_blobs(later) == sorted([sha, dangling])  # so that gc can delete the dangling link
    with pytest.raises(FileNotFoundError):
        store.fetch_to(dangling, path.parent / "nothing")
    store.delete(dangling)
    assert sorted(objects(store)) == [f"links/{sha}/{linked.id}", f"uploads/{linked.id}"]


def test_s3_blob_stored_by_an_older_version_is_still_found(s3_store, tmp_path, staged):
    """Versions before links copied every upload to `sha256/<sha>`: such a blob is found, kept and deleted."""
    store = s3_store
    path, sha = staged
    store.ping()  # makes the bucket
    store.client.fput_object(store.bucket, f"sha256/{sha}", str(path))
    assert store.exists(sha) and store.list_blobs(datetime.now(UTC) + timedelta(minutes=1)) == [sha]
    assert streamed(store, path.read_bytes()).commit(sha) is False
    assert store.put_file(path, sha) is False
    assert list(objects(store)) == [f"sha256/{sha}"]
    store.fetch_to(sha, tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == path.read_bytes()
    store.delete(sha)
    assert objects(store) == {}


def test_s3_empty_streamed_file(s3_store, tmp_path):
    store = s3_store
    upload = store.open_upload()
    sha = hashlib.sha256(b"").hexdigest()
    assert upload.commit(sha) is True
    store.fetch_to(sha, tmp_path / "empty")
    assert (tmp_path / "empty").read_bytes() == b""


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
