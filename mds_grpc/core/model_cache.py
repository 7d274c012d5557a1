"""Loaded model versions: an LRU bounded by model bytes, loaded from storage on first use or, after a restart,
preloaded in the background in the order they were last used."""

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import TYPE_CHECKING

from mds_grpc import metrics
from mds_grpc.core.errors import NotFound
from mds_grpc.core.placement import Placer
from mds_grpc.core.prepacked import PrepackedCopies
from mds_grpc.core.records import MAIN_FILE, ModelRecord
from mds_grpc.core.runtime import OnnxSession
from mds_grpc.core.stores import BlobStore

if TYPE_CHECKING:
    from mds_grpc.core.batching import Batcher

log = logging.getLogger("mds.model_cache")
Key = tuple[str, int]  # (name, version)
ORDER_FILE = "loaded-models.json"  # in MDS_DATA_DIR: see ModelCache.save_order and gather_orders


def order_file(data_dir: Path, process: int | None = None) -> Path:
    """Where a serving process records its loaded versions: one file per process of `mds serve --processes N`."""
    return data_dir / (ORDER_FILE if process is None else ORDER_FILE.replace(".json", f"-{process}.json"))


def read_order(path: Path) -> list[Key]:
    """The versions an order file lists, most recently used first.

    A missing file is no versions; an unreadable or malformed one is ignored, with a warning."""
    try:
        entries = json.loads(path.read_text())["models"]
        keys = [(entry["name"], entry["version"]) for entry in entries]
        if not all(type(n) is str and n and type(v) is int and v > 0 for n, v in keys):
            raise ValueError("a name is not a string or a version not a positive integer")
    except FileNotFoundError:
        return []
    except (OSError, ValueError, LookupError, TypeError) as error:
        log.warning(
            "ignoring the record of the models loaded before",
            extra={"path": str(path), "error": f"{type(error).__name__}: {error}"},
        )
        return []
    return list(dict.fromkeys(keys))


def write_order(path: Path, keys: list[Key]) -> None:
    """Replace the file at once (a temp file of this process's own, renamed over it): a reader never sees a part."""
    text = json.dumps({"models": [{"name": name, "version": version} for name, version in keys]})
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text + "\n")
    os.replace(partial, path)


def gather_orders(data_dir: Path) -> list[Key]:
    """At start, before any serving process runs: merge what every process recorded into ORDER_FILE, and remove
    the per-process files. The lists are interleaved (each one's most recent first, then each one's second...),
    so every serving process of the next start preloads what any of them used, whatever their number then."""
    paths = [order_file(data_dir), *sorted(data_dir.glob(ORDER_FILE.replace(".json", "-*.json")))]
    lists = [read_order(path) for path in paths]
    merged = list(dict.fromkeys(key for rank in zip_longest(*lists) for key in rank if key is not None))
    if len(paths) > 1 or lists[0] != merged:
        write_order(order_file(data_dir), merged)
    for path in paths[1:]:
        path.unlink(missing_ok=True)
    return merged


@dataclass(eq=False)
class LoadedModel:
    """Everything of one loaded model version; it lives exactly as long as the version stays in the cache."""

    record: ModelRecord
    session: OnnxSession  # with its run statistics
    batcher: "Batcher | None" = None  # made on first use when the version was uploaded with a batching policy
    # Until when (time.monotonic()) a lookup of version 0 (the latest) or of this version may answer with
    # this one without reading the metadata store.
    trusted_until: dict[int, float] = field(default_factory=dict)


def materialize(blobs: BlobStore, record: ModelRecord, folder: Path, shared: Path | None = None) -> Path:
    """The model's files in `folder` (built under a temp name, then renamed); kept when present. With `shared`,
    each file is a hard link to the host's one copy of it there (see fetch_shared)."""
    if folder.exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.part")
    try:
        for stored in record.files:
            (partial / stored.path).parent.mkdir(parents=True, exist_ok=True)
            if shared is None:
                blobs.fetch_to(stored.sha256, partial / stored.path)
            else:
                fetch_shared(blobs, stored.sha256, shared, partial / stored.path)
        partial.rename(folder)
    except OSError:
        if not folder.exists():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def fetch_shared(blobs: BlobStore, sha256: str, shared: Path, dest: Path) -> None:
    """Hard-link `dest` to the blob's copy in `shared`, fetched there first when missing: the serving processes
    of a host share one file, so its pages (memory-mapped weights) are in the page cache once."""
    copy = shared / sha256
    try:
        os.link(copy, dest)
        return
    except FileNotFoundError:
        pass
    shared.mkdir(parents=True, exist_ok=True)
    partial = shared / f".{sha256}.{uuid.uuid4().hex}.part"
    try:
        blobs.fetch_to(sha256, partial)
        with contextlib.suppress(FileExistsError):  # another process fetched it meanwhile: share that one
            os.link(partial, copy)
        try:
            os.link(copy, dest)
        except FileNotFoundError:  # released meanwhile as unused: this one stays private
            os.link(partial, dest)
    finally:
        partial.unlink(missing_ok=True)


def release_shared(shared: Path) -> None:
    """Remove the copies no model folder links any more (a process linking one then fetches it again)."""
    for copy in shared.glob("[0-9a-f]*"):
        with contextlib.suppress(FileNotFoundError):
            if copy.stat().st_nlink == 1:
                copy.unlink()


class ModelCache:
    """Sessions keyed by (name, version), each with its files in a local folder.

    The sum of the CPU sessions' file sizes stays under `capacity_bytes`, in memory and on disk; the
    most recently used model always stays, even when it alone exceeds the bound. Sessions on a GPU
    count their device memory limit against that GPU's budget instead, evicted the same way.
    A version with `shared_weights_min_bytes` or more of external data and no batching policy runs lean (see
    OnnxSession), on weights mapped from its files: with the embedded store, hard links to one stored copy.
    With `prepacked` copies, a CPU version of at least that many bytes then switches to the host's prepacked
    copy (see core.prepacked), made in a helper process by `run_helper` when the host has none yet; a version
    whose copy exists loads it at once.

    With an `order_file`, the cache records which versions it holds, most recently used first, so that
    the next start can load them again before they are asked for (recall, then preload). The file is
    rewritten whole (a temp file renamed over it) when a version is loaded, evicted or deleted, and at
    shutdown (save_order), not on every hit. Each serving process writes a file of its own (order_file), and
    gather_orders merges them before the next start.
    """

    def __init__(
        self,
        blobs: BlobStore,
        folder_root: Path,
        capacity_bytes: int,
        intra_op_threads: int = 0,
        placer: Placer | None = None,
        order_file: Path | None = None,
        shared_weights_min_bytes: int = 64 << 20,
        shared_files: Path | None = None,
        prepacked: PrepackedCopies | None = None,
        run_helper: Callable[..., Awaitable] | None = None,
    ):
        self.blobs = blobs
        self.folder_root = Path(folder_root)
        self.capacity_bytes = capacity_bytes
        self.intra_op_threads = intra_op_threads
        self.placer = placer or Placer()
        self.order_file = order_file
        self.shared_weights_min_bytes = shared_weights_min_bytes
        self.shared_files = shared_files  # see fetch_shared; None: the store's fetch_to shares (hard links)
        self.prepacked = prepacked if run_helper is not None else None
        self.run_helper = run_helper
        self._packing: dict[Key, asyncio.Task] = {}  # versions switching to the host's prepacked copy
        self._models: OrderedDict[tuple[str, int], LoadedModel] = OrderedDict()
        self._latest: dict[str, LoadedModel] = {}  # the version a lookup of "the latest" last resolved to
        self._loading: dict[tuple[str, int], asyncio.Task] = {}
        self._pending: list[Key] = []  # recalled versions preload has not come to yet, most recent first
        self._save_failed = False

    def _folder(self, key: tuple[str, int]) -> Path:
        return self.folder_root / key[0] / str(key[1])

    def clear_folders(self) -> None:
        """Remove every model folder, and prepacked copies an earlier run left half made (at start-up: none is
        loaded yet)."""
        shutil.rmtree(self.folder_root, ignore_errors=True)
        if self.prepacked is not None:
            self.prepacked.remove_partial()

    @property
    def loaded_bytes(self) -> int:
        """The file bytes of the sessions on the CPU."""
        return sum(m.record.total_bytes for m in self._models.values() if m.session.device is None)

    def device_bytes(self, device: int) -> int:
        """The device memory limits of the sessions on GPU `device`."""
        return sum(m.session.target.device_memory_bytes for m in self._models.values() if m.session.device == device)

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

    async def get(self, record: ModelRecord, preload: bool = False) -> LoadedModel:
        """The loaded version, loaded now if need be; a `preload` neither counts as a use nor makes it recent."""
        key = (record.name, record.version)
        model = self._models.get(key)
        if model is not None:
            if not preload:
                self._models.move_to_end(key)
                metrics.cache_event("hit")
            return model
        task = self._loading.get(key)
        if task is None:  # one load per model, shared by every waiter and finished even if they leave
            metrics.cache_event("preload" if preload else "load")
            task = self._loading[key] = asyncio.ensure_future(self._load(record, oldest=preload))
            task.add_done_callback(lambda _: self._loading.pop(key, None))
        loaded: LoadedModel = await asyncio.shield(task)
        if not preload and self._models.get(key) is loaded:  # a request that joined a preload uses it now
            self._models.move_to_end(key)
        return loaded

    async def _load(self, record: ModelRecord, oldest: bool = False) -> LoadedModel:
        deleted = NotFound(f"model {record.name!r} version {record.version} was deleted")
        try:
            folder = await asyncio.to_thread(self._materialize, record)
        except FileNotFoundError:
            raise deleted from None
        target = self.placer.target(record.name, record.version, record.placement)
        # Big external data stays memory-mapped, not prepacked: every process of the host maps the same pages;
        # a version that batches requests runs many rows at once, which prepacked weights do faster. Either
        # then switches to the host's prepacked copy, which is both (loaded at once when the host has it).
        external = sum(f.size_bytes for f in record.files if f.path != MAIN_FILE)
        shared = external >= self.shared_weights_min_bytes and not record.batching.enabled
        on_gpu = self.placer.on_gpu(record.placement)
        prepacked = self.prepacked if not on_gpu and record.total_bytes >= self.shared_weights_min_bytes else None
        if on_gpu:  # free the device before the new session takes its share
            self._make_room(target.device_id, target.device_memory_bytes)
        try:
            copy = await asyncio.to_thread(prepacked.link, record, folder) if prepacked else None
            path = copy or folder / MAIN_FILE
            session = await asyncio.to_thread(OnnxSession, path, self.intra_op_threads, shared and not copy, target)
        except Exception:
            if not (folder / MAIN_FILE).exists():  # a delete removed the folder while it was loading
                raise deleted from None
            raise
        model = self.put(record, session, oldest)
        if copy is not None:
            log.info("prepacked weights in use", extra={"model": record.name, "version": record.version})
        elif prepacked:
            log.info("switching to a prepacked copy", extra={"model": record.name, "version": record.version})
            key = (record.name, record.version)
            self._packing[key] = asyncio.ensure_future(self._switch_to_prepacked(model, folder))
            self._packing[key].add_done_callback(lambda _: self._packing.pop(key, None))
        return model

    async def _switch_to_prepacked(self, model: LoadedModel, folder: Path) -> None:
        """Have the host's prepacked copy of the version made (or wait for another process making it), then
        run the version on it; on failure the version keeps its session, with a warning."""
        record, key = model.record, (model.record.name, model.record.version)
        which = {"model": record.name, "version": record.version}
        assert self.prepacked is not None and self.run_helper is not None
        try:
            started = time.monotonic()
            if self._models.get(key) is not model:
                return  # evicted at once (the cache is full)
            copy = await self.prepacked.make(record, folder, self.run_helper)
            if self._models.get(key) is not model:
                return  # evicted or deleted meanwhile: release drops the copy if nothing else links it
            if copy is None:
                raise FileNotFoundError("the model's folder went before it linked the copy")
            session = await asyncio.to_thread(OnnxSession, copy, self.intra_op_threads, False, model.session.target)
            if self._models.get(key) is model:
                model.session = session  # runs under way finish on the session they started with
                log.info("prepacked weights in use", extra={**which, "seconds": round(time.monotonic() - started, 3)})
        except Exception as error:
            log.warning(
                "model keeps its own weights: no prepacked copy",
                extra={**which, "error": str(error) or type(error).__name__},
            )

    async def settle(self) -> None:
        """Wait until every loaded version runs on the session it will keep (its prepacked copy, if any)."""
        while self._packing:
            await asyncio.wait(list(self._packing.values()))

    def _materialize(self, record: ModelRecord) -> Path:
        return materialize(self.blobs, record, self._folder((record.name, record.version)), self.shared_files)

    def adopt_folder(self, record: ModelRecord, folder: Path) -> None:
        """Take a fully written folder (e.g. a validated upload) as the model's folder; with `shared_files`, its
        files become the host's copies that other processes link to."""
        if self.shared_files is not None:
            self.shared_files.mkdir(parents=True, exist_ok=True)
            for stored in record.files:
                with contextlib.suppress(FileExistsError):
                    os.link(folder / stored.path, self.shared_files / stored.sha256)
        target = self._folder((record.name, record.version))
        target.parent.mkdir(parents=True, exist_ok=True)
        folder.rename(target)

    def put(self, record: ModelRecord, session: OnnxSession, oldest: bool = False) -> LoadedModel:
        """Hold the session as the most recently used version or, `oldest` (a preload), the least recently used."""
        key = (record.name, record.version)
        model = self._models[key] = LoadedModel(record, session)
        self._models.move_to_end(key, last=not oldest)
        keep = next(reversed(self._models.values()))  # the most recently used stays
        if session.device is None:
            while self.loaded_bytes > self.capacity_bytes and self._evict(lambda m: m.session.device is None, keep):
                pass
        else:
            self._make_room(session.device, 0, keep)
        self.save_order()
        return model

    def _make_room(self, device: int, bytes_needed: int, keep: LoadedModel | None = None) -> None:
        """Evict the least recently used sessions of GPU `device` until `bytes_needed` more fit its budget."""
        budget = self.placer.device_budget_bytes - bytes_needed
        while self.device_bytes(device) > budget and self._evict(lambda m: m.session.device == device, keep):
            pass
        self._report(device)

    def _report(self, device: int) -> None:
        sessions = sum(m.session.device == device for m in self._models.values())
        metrics.device_usage(device, sessions, self.device_bytes(device))

    def _evict(self, eligible, keep: LoadedModel | None) -> bool:
        """Drop the least recently used eligible model other than `keep`; False when there is none."""
        key = next((k for k, m in self._models.items() if m is not keep and eligible(m)), None)
        if key is None:
            return False
        self._drop(key)
        metrics.cache_event("eviction")
        return True

    def _drop(self, key: tuple[str, int]) -> None:
        """Forget a session and remove its folder, so the local copies stay bounded too.

        Runs still using the session keep working: open files outlive their unlinking.
        """
        model = self._models.pop(key, None)
        if model is not None and self._latest.get(key[0]) is model:
            del self._latest[key[0]]
        if model is not None and model.session.device is not None:
            self._report(model.session.device)  # its device memory goes when the last run using it ends
        folder = self._folder(key)
        trash = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.trash")
        try:
            folder.rename(trash)  # at once, so a new load materializes afresh
        except FileNotFoundError:
            return
        try:
            asyncio.get_running_loop().run_in_executor(None, self._remove, trash)
        except RuntimeError:  # no event loop (a script or a test driving the cache directly)
            self._remove(trash)

    def _remove(self, trash: Path) -> None:
        shutil.rmtree(trash, ignore_errors=True)
        if self.shared_files is not None:
            release_shared(self.shared_files)
        if self.prepacked is not None:
            self.prepacked.release()

    def forget(self, name: str, versions: list[int]) -> None:
        """Drop the sessions and folders of deleted versions."""
        for version in versions:
            self._drop((name, version))
            engines = self.placer.engine_folder(name, version)
            if engines is not None:
                shutil.rmtree(engines, ignore_errors=True)
        self._pending = [key for key in self._pending if key[0] != name or key[1] not in versions]
        self.save_order()

    def save_order(self) -> None:
        """Write the order file: the loaded versions, most recently used first, then those preload has yet to load.

        Called on the event loop only (see write_order); a failure is logged once and otherwise ignored.
        """
        if self.order_file is None:
            return
        keys = [*reversed(self._models), *(key for key in self._pending if key not in self._models)]
        try:
            write_order(self.order_file, keys)
        except OSError as error:
            if not self._save_failed:
                log.warning(
                    "cannot record the loaded models", extra={"path": str(self.order_file), "error": str(error)}
                )
            self._save_failed = True

    def recall(self, source: Path | None = None) -> list[Key]:
        """The versions `source` (the order file by default) lists, most recently used first, now pending preload."""
        source = source or self.order_file
        self._pending = [] if source is None else read_order(source)
        return list(self._pending)

    def _fits(self, record: ModelRecord) -> bool:
        """Whether the version can load without evicting anything (or, on the CPU, the cache is empty)."""
        if self.placer.on_gpu(record.placement):
            target = self.placer.target(record.name, record.version, record.placement)
            used = self.device_bytes(target.device_id) + target.device_memory_bytes
            return used <= self.placer.device_budget_bytes
        return self.loaded_bytes == 0 or self.loaded_bytes + record.total_bytes <= self.capacity_bytes

    async def preload(self, lookup: Callable[[str, int], Awaitable[ModelRecord]]) -> None:
        """Load the recalled versions, most recently used first, while requests are served.

        One at a time, each after the loads requests started meanwhile, through get (a request for a
        version being preloaded waits for that load), as long as the cache has room. `lookup` reads a
        version's record; a version deleted meanwhile is skipped silently, and a failure is logged once.
        """
        if not self._pending:
            return
        started, loaded = time.monotonic(), 0
        for key in list(self._pending):
            if key not in self._pending:  # deleted meanwhile
                continue
            while self._loading:  # loads requests are waiting for go first
                await asyncio.wait(list(self._loading.values()))
            which = {"model": key[0], "version": key[1]}
            try:
                record = None if key in self._models else await lookup(*key)
                if record is None or key in self._models:
                    pass  # a request loaded it first
                elif not self._fits(record):
                    log.info("model not preloaded: the cache is full", extra=which)
                else:
                    begin = time.monotonic()
                    await self.get(record, preload=True)
                    loaded += 1
                    log.info("model preloaded", extra={**which, "seconds": round(time.monotonic() - begin, 3)})
            except NotFound:
                pass  # deleted since it was recorded
            except Exception as error:
                log.warning("model not preloaded", extra={**which, "error": str(error) or type(error).__name__})
            self._pending = [k for k in self._pending if k != key]
        log.info("preloading done", extra={"loaded": loaded, "seconds": round(time.monotonic() - started, 3)})
