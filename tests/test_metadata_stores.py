"""Every metadata store passes the same tests: SQLite (embedded default) and MongoDB (FerretDB here)."""

import dataclasses
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from mds_grpc.core.records import ModelRecord, StoredFile, TensorSpec
from mds_grpc.storage.mongo_metadata import MongoConnection, MongoMetadataStore
from mds_grpc.storage.sqlite_metadata import SqliteMetadataStore


def draft(name: str, sha: str = "a" * 64) -> ModelRecord:
    return ModelRecord(
        name=name,
        version=0,
        created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        files=(StoredFile("model.onnx", sha, 10), StoredFile("w.bin", "b" * 64, 20)),
        inputs=(TensorSpec("x", "FP32", (-1, 3), "tensor(float)", ("n", "")),),
        outputs=(TensorSpec("y", None, (), "seq(map(int64,tensor(float)))"),),
        opsets=(("", 17), ("ai.onnx.ml", 3)),
        labels={"team": "a"},
        metadata={"nested": {"k": [1, "two"]}},
    )


@pytest.fixture(params=["sqlite", "mongo"])
def open_store(request, tmp_path):
    """Opens a new client of one fresh store (each test gets its own database)."""
    if request.param == "sqlite":
        return lambda: SqliteMetadataStore(tmp_path / "meta.sqlite3")
    uri, database = request.getfixturevalue("services")["MDS_MONGO_URI"], "test-" + uuid.uuid4().hex[:12]
    return lambda: MongoMetadataStore(MongoConnection(uri, database))


@pytest.fixture
def store(open_store):
    return open_store()


def test_record_round_trips(store):
    stored = store.create(draft("m"))
    assert stored.version == 1
    assert store.get("m", 1) == stored == dataclasses.replace(draft("m"), version=1)


def test_concurrent_creates_from_two_clients_get_distinct_versions(open_store):
    stores = [open_store(), open_store()]
    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(lambda i: stores[i % 2].create(draft("m")).version, range(40)))
    assert sorted(versions) == list(range(1, 41))


def test_latest_and_missing(store):
    for _ in range(3):
        store.create(draft("m"))
    assert store.get("m", 0).version == 3
    assert store.get("m", 4) is None and store.get("other", 0) is None


def test_versions_are_never_reused_after_delete(store):
    store.create(draft("m"))
    store.create(draft("m"))
    assert [r.version for r in store.delete("m", 0)] == [1, 2]
    assert store.get("m", 0) is None
    assert store.create(draft("m")).version == 3


def test_pages_follow_name_then_version(store):
    for name in ("b", "a", "c", "a"):
        store.create(draft(name))
    first = store.list_page(None, None, 3)
    assert [(r.name, r.version) for r in first] == [("a", 1), ("a", 2), ("b", 1)]
    rest = store.list_page(None, ("b", 1), 3)
    assert [(r.name, r.version) for r in rest] == [("c", 1)]
    assert [(r.name, r.version) for r in store.list_page("a", ("a", 1), 10)] == [("a", 2)]


def test_blob_references_follow_deletes(store):
    store.create(draft("one", sha="c" * 64))
    store.create(draft("two", sha="c" * 64))
    store.delete("one", 1)
    assert store.blob_in_use("c" * 64)
    store.delete("two", 0)
    assert not store.blob_in_use("c" * 64) and not store.blob_in_use("b" * 64)
    assert store.delete("two", 0) == []


SHA = "d" * 64
HOUR = timedelta(hours=1)


def ago(delta: timedelta = timedelta()) -> datetime:
    return datetime.now(UTC) - delta


def test_claims_and_deletions_of_a_blob_exclude_each_other_across_clients(open_store):
    publisher, deleter = open_store(), open_store()
    assert publisher.claim_blob(SHA, ago(HOUR)) and publisher.claim_blob(SHA, ago(HOUR))  # two publishes
    assert not deleter.begin_blob_deletion(SHA, "t1", ago(HOUR), ago(HOUR))
    publisher.release_blob(SHA)
    assert not deleter.begin_blob_deletion(SHA, "t1", ago(HOUR), ago(HOUR))  # one claim is still held
    publisher.release_blob(SHA)
    assert deleter.begin_blob_deletion(SHA, "t1", ago(HOUR), ago(HOUR))
    assert not publisher.claim_blob(SHA, ago(HOUR))
    assert not open_store().begin_blob_deletion(SHA, "t2", ago(HOUR), ago(HOUR))  # one deletion at a time
    deleter.end_blob_deletion(SHA, "t1")
    assert publisher.claim_blob(SHA, ago(HOUR))


def test_guards_left_by_a_crashed_process_go_stale(store):
    assert store.claim_blob(SHA, ago(HOUR))  # never released
    assert not store.begin_blob_deletion(SHA, "t1", ago(HOUR), ago(HOUR))
    assert store.begin_blob_deletion(SHA, "t1", ago(-HOUR), ago(HOUR))  # claims before the cutoff are abandoned
    assert not store.claim_blob(SHA, ago(HOUR))  # never ended
    assert store.claim_blob(SHA, ago(-HOUR))  # a stale deletion is taken over
    store.end_blob_deletion(SHA, "t1")  # the late deleter's end changes nothing
    assert not store.begin_blob_deletion(SHA, "t2", ago(HOUR), ago(HOUR))
    store.release_blob(SHA)
    assert store.begin_blob_deletion(SHA, "t2", ago(-HOUR), ago(HOUR))
