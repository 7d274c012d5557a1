"""Loaded model versions: an LRU bounded by model bytes, loaded lazily from storage."""

import asyncio
import shutil
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mds_grpc import metrics
from mds_grpc.core.errors import NotFound
from mds_grpc.core.records import MAIN_FILE, ModelRecord
from mds_grpc.core.runtime import OnnxSession
from mds_grpc.core.stores import BlobStore

if TYPE_CHECKING:
    from mds_grpc.core.batching import Batcher


@dataclass(eq=False)
class LoadedModel:
    """Everything of one loaded model version; it lives exactly as long as the version stays in the cache."""

    record: ModelRecord
    session: OnnxSession  # with its run statistics
    batcher: "Batcher | None" = None  # made on first use when the version was uploaded with a batching policy
    # Until when (time.monotonic()) a lookup of version 0 (the latest) or of this version may answer with
    # this one without reading the metadata store.
    trusted_until: dict[int, float] = field(default_factory=dict)


def materialize(blobs: BlobStore, record: ModelRecord, folder: Path) -> Path:
    """The model's files in `folder` (built under a temp name, then renamed); kept when present."""
    if folder.exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.part")
    try:
        for stored in record.files:
            (partial / stored.path).parent.mkdir(parents=True, exist_ok=True)
            blobs.fetch_to(stored.sha256, partial / stored.path)
        partial.rename(folder)
    except OSError:
        if not folder.exists():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


class ModelCache:
    """Sessions keyed by (name, version), each with its files in a local folder.

    The sum of their file sizes stays under `capacity_bytes`, in memory and on disk; the
    most recently used model always stays, even when it alone exceeds the bound.
    """

    def __init__(self, blobs: BlobStore, folder_root: Path, capacity_bytes: int, intra_op_threads: int = 0):
        self.blobs = blobs
        self.folder_root = Path(folder_root)
        self.capacity_bytes = capacity_bytes
        self.intra_op_threads = intra_op_threads
        self._models: OrderedDict[tuple[str, int], LoadedModel] = OrderedDict()
        self._latest: dict[str, LoadedModel] = {}  # the version a lookup of "the latest" last resolved to
        self._loading: dict[tuple[str, int], asyncio.Task] = {}

    def _folder(self, key: tuple[str, int]) -> Path:
        return self.folder_root / key[0] / str(key[1])

    def clear_folders(self) -> None:
        """Remove every model folder (at start-up: none is loaded yet)."""
        shutil.rmtree(self.folder_root, ignore_errors=True)

    @property
    def loaded_bytes(self) -> int:
        return sum(m.record.total_bytes for m in self._models.values())

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._models

    def resolved(self, name: str, version: int) -> LoadedModel | None:
        """The loaded version a lookup of (name, version) may still trust (see LoadedModel.trusted_until)."""
        model = self._latest.get(name) if version == 0 else self._models.get((name, version))
        if model is None or model.trusted_until.get(version, 0.0) <= time.monotonic():
            return None
        key = (name, model.record.version)
        if self._models.get(key) is not model:  # replaced by a fresh load of the same version
            return None
        self._models.move_to_end(key)
        metrics.cache_event("hit")
        return model

    def trust(self, model: LoadedModel, version: int, seconds: float) -> None:
        """Let lookups of (name, version), version 0 being the latest, answer with `model` for `seconds`."""
        if self._models.get((model.record.name, model.record.version)) is not model:
            return  # evicted or deleted meanwhile
        model.trusted_until[version] = time.monotonic() + seconds
        if version == 0:
            self._latest[model.record.name] = model

    def forget_latest(self, name: str) -> None:
        """The latest version of `name` changed: the next lookup of it reads the metadata store."""
        self._latest.pop(name, None)

    async def get(self, record: ModelRecord) -> LoadedModel:
        key = (record.name, record.version)
        model = self._models.get(key)
        if model is not None:
            self._models.move_to_end(key)
            metrics.cache_event("hit")
            return model
        task = self._loading.get(key)
        if task is None:  # one load per model, shared by every waiter and finished even if they leave
            metrics.cache_event("load")
            task = self._loading[key] = asyncio.ensure_future(self._load(record))
            task.add_done_callback(lambda _: self._loading.pop(key, None))
        return await asyncio.shield(task)

    async def _load(self, record: ModelRecord) -> LoadedModel:
        deleted = NotFound(f"model {record.name!r} version {record.version} was deleted")
        try:
            folder = await asyncio.to_thread(self._materialize, record)
        except FileNotFoundError:
            raise deleted from None
        try:
            session = await asyncio.to_thread(OnnxSession, folder / MAIN_FILE, self.intra_op_threads)
        except Exception:
            if not (folder / MAIN_FILE).exists():  # a delete removed the folder while it was loading
                raise deleted from None
            raise
        return self.put(record, session)

    def _materialize(self, record: ModelRecord) -> Path:
        return materialize(self.blobs, record, self._folder((record.name, record.version)))

    def adopt_folder(self, record: ModelRecord, folder: Path) -> None:
        """Take a fully written folder (e.g. a validated upload) as the model's folder."""
        target = self._folder((record.name, record.version))
        target.parent.mkdir(parents=True, exist_ok=True)
        folder.rename(target)

    def put(self, record: ModelRecord, session: OnnxSession) -> LoadedModel:
        key = (record.name, record.version)
        model = self._models[key] = LoadedModel(record, session)
        self._models.move_to_end(key)
        while len(self._models) > 1 and self.loaded_bytes > self.capacity_bytes:
            self._drop(next(iter(self._models)))
            metrics.cache_event("eviction")
        return model

    def _drop(self, key: tuple[str, int]) -> None:
        """Forget a session and remove its folder, so the local copies stay bounded too.

        Runs still using the session keep working: open files outlive their unlinking.
        """
        model = self._models.pop(key, None)
        if model is not None and self._latest.get(key[0]) is model:
            del self._latest[key[0]]
        folder = self._folder(key)
        trash = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.trash")
        try:
            folder.rename(trash)  # at once, so a new load materializes afresh
        except FileNotFoundError:
            return
        try:
            asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, trash, True)
        except RuntimeError:  # no event loop (a script or a test driving the cache directly)
            shutil.rmtree(trash, ignore_errors=True)

    def forget(self, name: str, versions: list[int]) -> None:
        """Drop the sessions and folders of deleted versions."""
        for version in versions:
            self._drop((name, version))
