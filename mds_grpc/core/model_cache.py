"""Loaded onnxruntime sessions: an LRU bounded by model bytes, loaded lazily from storage."""

import asyncio
import shutil
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from mds_grpc.core.inspection import open_session
from mds_grpc.core.records import MAIN_FILE, ModelRecord
from mds_grpc.storage.base import BlobStore


@dataclass(frozen=True)
class LoadedModel:
    record: ModelRecord
    session: ort.InferenceSession


def model_folder(root: Path, record: ModelRecord) -> Path:
    return Path(root) / record.name / str(record.version)


class ModelCache:
    """Sessions keyed by (name, version); the sum of their file sizes stays under `capacity_bytes`.

    The most recently used model always stays, even when it alone exceeds the bound.
    """

    def __init__(self, blobs: BlobStore, folder_root: Path, capacity_bytes: int, intra_op_threads: int = 0):
        self.blobs = blobs
        self.folder_root = Path(folder_root)
        self.capacity_bytes = capacity_bytes
        self.intra_op_threads = intra_op_threads
        self._models: OrderedDict[tuple[str, int], LoadedModel] = OrderedDict()
        self._loading: dict[tuple[str, int], asyncio.Task] = {}

    @property
    def loaded_bytes(self) -> int:
        return sum(m.record.total_bytes for m in self._models.values())

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._models

    async def get(self, record: ModelRecord) -> LoadedModel:
        key = (record.name, record.version)
        model = self._models.get(key)
        if model is not None:
            self._models.move_to_end(key)
            return model
        task = self._loading.get(key)
        if task is None:  # one load per model, shared by every waiter and finished even if they leave
            task = self._loading[key] = asyncio.ensure_future(self._load(record))
            task.add_done_callback(lambda _: self._loading.pop(key, None))
        return await asyncio.shield(task)

    async def _load(self, record: ModelRecord) -> LoadedModel:
        folder = await asyncio.to_thread(self._materialize, record)
        session = await asyncio.to_thread(open_session, folder / MAIN_FILE, self.intra_op_threads)
        return self.put(record, session)

    def _materialize(self, record: ModelRecord) -> Path:
        """The model's files in its own folder (built under a temp name, then renamed)."""
        folder = model_folder(self.folder_root, record)
        if folder.exists():
            return folder
        partial = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.part")
        try:
            for stored in record.files:
                (partial / stored.path).parent.mkdir(parents=True, exist_ok=True)
                self.blobs.fetch_to(stored.sha256, partial / stored.path)
            partial.rename(folder)
        except OSError:
            if not folder.exists():
                raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return folder

    def adopt_folder(self, record: ModelRecord, folder: Path) -> None:
        """Take a fully written folder (e.g. a validated upload) as the model's folder."""
        target = model_folder(self.folder_root, record)
        target.parent.mkdir(parents=True, exist_ok=True)
        folder.rename(target)

    def put(self, record: ModelRecord, session: ort.InferenceSession) -> LoadedModel:
        key = (record.name, record.version)
        model = self._models[key] = LoadedModel(record, session)
        self._models.move_to_end(key)
        while len(self._models) > 1 and self.loaded_bytes > self.capacity_bytes:
            self._models.popitem(last=False)
        return model

    def forget(self, name: str, versions: list[int]) -> None:
        """Drop the sessions and folders of deleted versions."""
        for version in versions:
            self._models.pop((name, version), None)
            shutil.rmtree(self.folder_root / name / str(version), ignore_errors=True)
