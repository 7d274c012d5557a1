"""Every blob store passes the same tests: a local folder (embedded default) and S3 (MinIO here)."""

import hashlib
import uuid

import pytest

from mds_grpc.storage.local_blobs import LocalBlobStore
from mds_grpc.storage.s3_blobs import S3BlobStore


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    env = request.getfixturevalue("services")
    return S3BlobStore(env["MDS_S3_ENDPOINT"], env["MDS_S3_ACCESS_KEY"], env["MDS_S3_SECRET_KEY"],
                       bucket="test-" + uuid.uuid4().hex[:12])


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
    store = S3BlobStore(services["MDS_S3_ENDPOINT"], services["MDS_S3_ACCESS_KEY"], services["MDS_S3_SECRET_KEY"],
                        bucket="test-" + uuid.uuid4().hex[:12])
    path, sha = staged
    data = path.read_bytes()

    def stream():
        upload = store.open_upload()
        for offset in range(0, len(data), 1000):
            upload.write(data[offset:offset + 1000])
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
