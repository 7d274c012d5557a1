"""Every metadata store passes the same tests: SQLite (embedded default) and MongoDB (FerretDB here)."""

import dataclasses
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from mds_grpc.core.alias_records import AliasRecord
from mds_grpc.core.records import ModelRecord, StoredFile, TensorSpec, utc_now
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


def alias(name: str, version: int, canary_version: int = 0, canary_percent: int = 0, model: str = "m") -> AliasRecord:
    return AliasRecord(model, name, version, canary_version, canary_percent)


def test_aliases_are_created_moved_listed_and_deleted(store):
    before = utc_now()
    created = store.set_alias(alias("prod", 1), who="k1")
    assert created == dataclasses.replace(alias("prod", 1), updated_at=created.updated_at)
    assert before <= created.updated_at <= utc_now() and created.updated_at.tzinfo is not None
    assert store.get_alias("m", "prod") == created
    moved = store.set_alias(alias("prod", 2, canary_version=3, canary_percent=10), who="k2")
    assert store.get_alias("m", "prod") == moved and (moved.version, moved.canary_version) == (2, 3)
    store.set_alias(alias("beta", 3), who="k1")
    assert [(a.alias, a.version) for a in store.list_aliases("m")] == [("beta", 3), ("prod", 2)]
    assert store.delete_alias("m", "prod", who="k3") == moved
    assert store.get_alias("m", "prod") is None and store.delete_alias("m", "prod", who="k3") is None
    assert [a.alias for a in store.list_aliases("m")] == ["beta"]


def test_alias_history_lists_every_change_oldest_first_and_outlives_the_alias(store):
    first = store.set_alias(alias("prod", 1), who="k1")
    second = store.set_alias(alias("prod", 2, canary_version=3, canary_percent=10), who="k2")
    store.delete_alias("m", "prod", who="k3")
    store.delete_alias("m", "prod", who="k4")  # nothing to delete: no event
    history = store.alias_history("m", "prod")
    assert [(e.action, e.who, e.version, e.canary_version, e.canary_percent) for e in history] == [
        ("set", "k1", 1, 0, 0),
        ("set", "k2", 2, 3, 10),
        ("delete", "k3", 2, 3, 10),
    ]
    assert {(e.model, e.alias) for e in history} == {("m", "prod")}
    assert [e.at for e in history[:2]] == [first.updated_at, second.updated_at] and history[2].at >= history[1].at
    store.set_alias(alias("prod", 4), who="k5")
    assert [(e.action, e.version) for e in store.alias_history("m", "prod")[2:]] == [("delete", 2), ("set", 4)]


def test_aliases_of_different_models_are_independent(store):
    store.set_alias(alias("prod", 1, model="a"), who="")
    store.set_alias(alias("prod", 7, model="b"), who="")
    store.delete_alias("a", "prod", who="")
    assert store.get_alias("a", "prod") is None and store.get_alias("b", "prod").version == 7
    assert [a.model for a in store.list_aliases("b")] == ["b"] and store.list_aliases("a") == []
    assert [e.action for e in store.alias_history("b", "prod")] == ["set"]
    assert store.alias_history("c", "prod") == []


def test_concurrent_sets_of_one_alias_from_two_clients_leave_one_alias_and_every_event(open_store):
    stores, names = [open_store(), open_store()], [f"a{i}" for i in range(5)]  # each new alias is a race to create it
    with ThreadPoolExecutor(8) as pool:
        for name in names:
            for done in [pool.submit(stores[v % 2].set_alias, alias(name, v), f"k{v}") for v in range(1, 17)]:
                done.result()
    assert [a.alias for a in stores[0].list_aliases("m")] == names
    for name in names:
        assert 1 <= stores[1].get_alias("m", name).version <= 16
        history = stores[1].alias_history("m", name)
        assert sorted((e.version, e.who) for e in history) == [(v, f"k{v}") for v in range(1, 17)]


def test_an_existing_database_opens_again_with_its_aliases(open_store):
    open_store().set_alias(alias("prod", 1), who="k1")
    reopened = open_store()
    assert reopened.get_alias("m", "prod").version == 1
    assert [e.who for e in reopened.alias_history("m", "prod")] == ["k1"]
