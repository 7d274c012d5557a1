"""Deleting a shared blob races publishing the same bytes from another process; no record loses its blob.

Two registries, each with its own store clients (as two server processes would have), share one
metadata store and one blob store: SQLite and a local folder, or MongoDB (FerretDB) and S3 (MinIO).
`mds gc` runs as collect_garbage with clients of its own. Each test stops one side between two of
its storage calls, lets the other side run, then resumes it: the bad interleavings, forced. Then: a
deletion too slow for its lease gives up, and a private FerretDB stops while a publish is stopped.
"""

import asyncio
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest

import onnx_models
from backends import private_services, server_env
from harness import mongo_s3_settings, wait_until
from mds_grpc.config import load_settings
from mds_grpc.core import garbage
from mds_grpc.core.errors import Unavailable
from mds_grpc.core.job_records import JobInputRecord, JobTensor
from mds_grpc.core.model_cache import ModelCache
from mds_grpc.core.registry import ModelRegistry
from mds_grpc.core.stores import Storage
from mds_grpc.core.uploads import UploadHeader
from mds_grpc.storage import open_storage
from mds_grpc.storage.s3_blobs import S3BlobStore

SHARED = onnx_models.add_two(7.0)  # the bytes of both the old and the new model
FOREVER = datetime(9999, 1, 1, tzinfo=UTC)


class Interposed:
    """A real store whose method `pause_in` stops on its first call, before running, until `resume` is set.

    No backend can hold one client between two calls, so the test wraps the client; every call still
    reaches the real store. `returned` lists (method, result) of the calls made through it.
    """

    def __init__(self, store, pause_in: str = ""):
        self._store, self._pause_in = store, pause_in
        self.paused, self.resume = threading.Event(), threading.Event()
        self.returned: list[tuple[str, object]] = []

    def __getattr__(self, name: str):
        method = getattr(self._store, name)

        def call(*args, **kwargs):
            if name == self._pause_in and not self.paused.is_set():
                self.paused.set()
                assert self.resume.wait(60), "the test never resumed the paused call"
            result = method(*args, **kwargs)
            self.returned.append((name, result))
            return result

        return call if callable(method) else method

    async def stopped(self) -> None:
        """Wait until the paused call has been reached."""
        assert await asyncio.to_thread(self.paused.wait, 60), f"{self._pause_in} was never called"


@pytest.fixture(params=["embedded", "mongo-s3"])
def open_stores(request, tmp_path):
    """Opens new clients of one shared pair of stores, as a separate process would."""
    settings = {"data_dir": tmp_path / "shared"}
    if request.param == "mongo-s3":
        settings.update(mongo_s3_settings(request.getfixturevalue("services"), "race-" + uuid.uuid4().hex[:12]))
    return lambda: open_storage(load_settings(**settings))


def registry(storage: Storage, folder) -> ModelRegistry:
    registry = ModelRegistry(
        storage.metadata, storage.blobs, ModelCache(storage.blobs, folder / "models", 1 << 30), folder / "tmp", 1 << 30
    )
    registry.sweep_local_copies()
    return registry


async def upload(registry: ModelRegistry, name: str):
    async def parts():
        yield "model.onnx", SHARED

    return await registry.upload(UploadHeader(name=name), parts())


def assert_every_record_has_its_blobs_and_gc_leaves_none_unreferenced(storage: Storage) -> None:
    records = storage.metadata.list_page(None, None, 100)
    assert [(r.name, r.version) for r in records] == [("new", 1)]
    assert all(storage.blobs.exists(f.sha256) for r in records for f in r.files)
    garbage.collect_garbage(storage, grace_seconds=-60)
    assert storage.blobs.list_blobs(older_than=FOREVER) == [f.sha256 for f in records[0].files]


def start_deleter(deleter: str, stores: Storage, folder) -> asyncio.Future:
    """The deletion as a task: server A deleting the last model using the blob, or `mds gc` finding it orphaned."""
    if deleter == "delete":
        return asyncio.ensure_future(registry(stores, folder).delete("old"))
    return asyncio.ensure_future(asyncio.to_thread(garbage.collect_garbage, stores, -60))


async def orphan_or_last_use(deleter: str, stores: Storage, folder) -> None:
    """Store the shared blob under model "old"; for gc, drop the record so only the blob is left."""
    await upload(registry(stores, folder), "old")
    if deleter == "gc":  # as if the deleting process died between the record and the blob
        await asyncio.to_thread(stores.metadata.delete, "old", 0)


def publisher(open_stores, folder) -> tuple[ModelRegistry, Interposed]:
    """Server B, whose metadata client stops before it records a model."""
    stores = open_stores()
    metadata = Interposed(stores.metadata, pause_in="create")
    return registry(Storage(metadata, stores.blobs, stores.jobs), folder), metadata


@pytest.mark.parametrize("deleter", ["delete", "gc"])
async def test_a_publish_that_found_the_blob_stored_keeps_it(open_stores, tmp_path, deleter):
    """B finds the blob already stored, then A (or gc) deletes the last use before B records its model."""
    base = open_stores()
    await orphan_or_last_use(deleter, base, tmp_path / "a")
    blobs = Interposed(base.blobs, pause_in="list_blobs")
    stores = Storage(base.metadata, blobs, base.jobs)
    if deleter == "gc":  # gc with grace -60 counts claims older than itself as abandoned: it starts first
        deleting = start_deleter(deleter, stores, tmp_path / "a")
        await blobs.stopped()
    new, metadata = publisher(open_stores, tmp_path / "b")
    publishing = asyncio.ensure_future(upload(new, "new"))
    await metadata.stopped()  # the blob is stored, the record not yet
    if deleter == "delete":
        deleting = start_deleter(deleter, stores, tmp_path / "a")
    blobs.resume.set()
    await deleting
    metadata.resume.set()
    assert (await publishing).version == 1
    assert_every_record_has_its_blobs_and_gc_leaves_none_unreferenced(open_stores())


@pytest.mark.parametrize("deleter", ["delete", "gc"])
async def test_a_publish_during_a_deletion_stores_the_blob_again(open_stores, tmp_path, deleter):
    """A (or gc) has decided the blob is unused and is about to delete it when B publishes the same bytes."""
    base = open_stores()
    await orphan_or_last_use(deleter, base, tmp_path / "a")
    blobs = Interposed(base.blobs, pause_in="delete")
    deleting = start_deleter(deleter, Storage(base.metadata, blobs, base.jobs), tmp_path / "a")
    await blobs.stopped()
    new, metadata = publisher(open_stores, tmp_path / "b")
    metadata.resume.set()  # B is not stopped here
    publishing = asyncio.ensure_future(upload(new, "new"))
    # B either finishes (nothing stops it) or is seen waiting for the deletion to end.
    await asyncio.to_thread(
        wait_until,
        lambda: publishing.done() or ("claim_blob", False) in metadata.returned,
        60,
        "the publish to finish or wait",
    )
    blobs.resume.set()
    await deleting
    assert (await publishing).version == 1
    assert_every_record_has_its_blobs_and_gc_leaves_none_unreferenced(open_stores())


async def test_a_deletion_slower_than_half_its_lease_gives_up(open_stores, tmp_path, monkeypatch):
    """Past the lease a publish may take the deletion mark over, so a deleter that late must not delete."""
    stores = open_stores()
    await orphan_or_last_use("gc", stores, tmp_path / "a")
    (sha256,) = stores.blobs.list_blobs(older_than=FOREVER)
    monkeypatch.setattr(garbage, "DELETION_LEASE", timedelta(0))
    assert not garbage.delete_unreferenced(stores.metadata, stores.blobs, sha256)
    assert stores.blobs.exists(sha256)
    monkeypatch.undo()
    assert garbage.delete_unreferenced(stores.metadata, stores.blobs, sha256)
    assert not stores.blobs.exists(sha256)


async def test_gc_keeps_a_blob_a_job_input_recorded_after_its_snapshot(open_stores, tmp_path):
    """gc lists references once; a job input recorded after that (a retried upload of the same rows) is seen
    under the deletion mark, so its blob stays."""
    stores = open_stores()
    await orphan_or_last_use("gc", stores, tmp_path / "a")
    (sha256,) = stores.blobs.list_blobs(older_than=FOREVER)
    rows = JobInputRecord(uuid.uuid4().hex, 1, (JobTensor("x", "FP32", (), sha256),), datetime.now(UTC))
    stores.jobs.create_input(rows)
    assert not garbage.delete_unreferenced(stores.metadata, stores.blobs, sha256, jobs=stores.jobs)
    assert stores.blobs.exists(sha256)


def everything_in(blobs) -> list[str]:
    """Every object in the bucket, or every file in the blob folder."""
    if isinstance(blobs, S3BlobStore):
        return sorted(o.object_name for o in blobs.client.list_objects(blobs.bucket, recursive=True))
    return sorted(str(p.relative_to(blobs.root)) for p in blobs.root.rglob("*") if p.is_file())


async def test_gc_removes_an_unreferenced_uploaded_blob_whole(open_stores, tmp_path):
    """On S3 an uploaded file is its upload object and the link naming it by hash: gc removes both."""
    stores = open_stores()
    await orphan_or_last_use("gc", stores, tmp_path / "a")
    (sha256,) = stores.blobs.list_blobs(older_than=FOREVER)
    assert len(everything_in(stores.blobs)) == (2 if isinstance(stores.blobs, S3BlobStore) else 1)
    assert garbage.collect_garbage(stores, -60) == {"orphan_blobs": [sha256], "partial_writes": []}
    assert everything_in(stores.blobs) == []


async def test_a_claim_keeps_an_uploaded_blob_from_gc(open_stores, tmp_path):
    """A publish's claim taken after gc's grace period blocks the deletion: the blob stays whole."""
    stores = open_stores()
    await orphan_or_last_use("gc", stores, tmp_path / "a")
    (sha256,) = stores.blobs.list_blobs(older_than=FOREVER)
    stored = everything_in(stores.blobs)
    await asyncio.sleep(1.2)  # the blob is older than gc's grace of 1 s; the claim below is younger
    assert stores.metadata.claim_blob(sha256, datetime.now(UTC) - garbage.DELETION_LEASE)
    assert garbage.collect_garbage(open_stores(), 1) == {"orphan_blobs": [], "partial_writes": []}
    assert not garbage.delete_unreferenced(stores.metadata, stores.blobs, sha256)
    assert everything_in(stores.blobs) == stored and stores.blobs.exists(sha256)
    stores.metadata.release_blob(sha256)
    assert garbage.collect_garbage(open_stores(), 1) == {"orphan_blobs": [sha256], "partial_writes": []}
    assert everything_in(stores.blobs) == []


@pytest.mark.parametrize("stopped_in", ["create", "release_blob"])
async def test_metadata_lost_in_the_middle_of_a_publish_leaves_nothing_after_gc(tmp_path, stopped_in):
    """Private FerretDB stops while a publish holds its claim, before the record or after it.

    Before, the upload fails and cannot remove its blob; after, it succeeds though its claim stays.
    Either way, once FerretDB is back, `mds gc` (which counts claims older than itself as abandoned)
    leaves no blob that no record references.
    """
    with private_services(tmp_path) as (mongo, s3, queue):
        env = server_env(mongo, s3, queue)
        settings = load_settings(
            data_dir=tmp_path / "mds",
            mongo_uri=env["MDS_MONGO_URI"],
            s3_endpoint=env["MDS_S3_ENDPOINT"],
            s3_access_key=env["MDS_S3_ACCESS_KEY"],
            s3_secret_key=env["MDS_S3_SECRET_KEY"],
            s3_bucket=env["MDS_S3_BUCKET"],
        )
        stores = open_storage(settings)
        metadata = Interposed(stores.metadata, pause_in=stopped_in)
        publishing = asyncio.ensure_future(
            upload(registry(Storage(metadata, stores.blobs, stores.jobs), tmp_path / "b"), "new")
        )
        await metadata.stopped()
        await asyncio.to_thread(mongo.stop)
        metadata.resume.set()
        if stopped_in == "create":
            with pytest.raises(Unavailable, match="MongoDB"):
                await publishing
        else:
            assert (await publishing).version == 1  # recorded: the upload is acknowledged
        await asyncio.to_thread(mongo.start)
        after = open_storage(settings)
        assert [r.name for r in after.metadata.list_page(None, None, 10)] == ([] if stopped_in == "create" else ["new"])
        if stopped_in == "release_blob":
            await registry(after, tmp_path / "c").delete("new")
        await asyncio.to_thread(garbage.collect_garbage, after, -60)
        assert after.blobs.list_blobs(older_than=FOREVER) == []
