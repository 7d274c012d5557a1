"""The local-filesystem blob store (embedded default)."""

import hashlib


import pytest

from mds_grpc.storage.local_blobs import LocalBlobStore


@pytest.fixture
def staged(tmp_path):
    path = tmp_path / "staged.bin"
    path.write_bytes(b"model bytes")
    return path, hashlib.sha256(b"model bytes").hexdigest()


def test_put_fetch_delete(tmp_path, staged):
    store = LocalBlobStore(tmp_path / "blobs")
    path, sha = staged
    store.put_file(path, sha)
    store.put_file(path, sha)  # idempotent
    assert store.exists(sha)
    dest = tmp_path / "out" / "model.onnx"
    dest.parent.mkdir()
    store.fetch_to(sha, dest)
    assert dest.read_bytes() == b"model bytes"
    assert oct((tmp_path / "blobs" / "sha256" / sha[:2] / sha).stat().st_mode & 0o777) == "0o444"
    store.delete(sha)
    store.delete(sha)  # a missing blob is fine
    assert not store.exists(sha)


def test_fetching_a_missing_blob_fails(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs")
    with pytest.raises(FileNotFoundError):
        store.fetch_to("0" * 64, tmp_path / "x")
