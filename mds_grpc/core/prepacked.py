"""Prepacked copies of big models, one per host, mapped by every serving process.

onnxruntime prepacks a model's weights when it loads it (lays them out for its matrix kernels): runs of many
rows are then about three times faster, but each process holds its own copy on the heap. A copy saved by
onnxruntime as an optimized model, its prepacked weights in external data, maps them from the file instead:
its pages are in the page cache once for every process of the host. A copy suits only the onnxruntime build
and CPU that made it, so its name digests both with the model's files. It is made once, in a helper process,
and takes about twice the weights on disk; a copy no model folder links any more is removed (`release`).
"""

import asyncio
import contextlib
import fcntl
import hashlib
import os
import platform
import shutil
import threading
import uuid
from functools import cache
from pathlib import Path

from mds_grpc.core.records import MAIN_FILE, ModelRecord
from mds_grpc.core.runtime import runtime_version, save_prepacked

LINKS = ".prepacked~"  # in a model folder: links to its copy ('~' is in no uploaded file's path)
DATA_FILE = f"{MAIN_FILE}.data"


@cache
def _machine() -> str:
    """The onnxruntime build and the CPU's features, which the kernels a copy was laid out for depend on."""
    with contextlib.suppress(OSError):
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
        return f"{runtime_version()} {platform.machine()} {flags}"
    return f"{runtime_version()} {platform.machine()} {platform.processor()}"


def digest(record: ModelRecord) -> str:
    """The name of the version's copy: the same for every version with the same files, on the same machine."""
    files = " ".join(f"{stored.path}={stored.sha256}" for stored in record.files)
    return hashlib.sha256(f"{files} {_machine()}".encode()).hexdigest()


def write_copy(source: Path, folder: Path) -> None:
    """Write the prepacked copy of the model at `source` into `folder` (in a helper process: it takes about
    the model twice in memory)."""
    save_prepacked(source, folder / MAIN_FILE, DATA_FILE)


class PrepackedCopies:
    """The host's copies, in `root` (shared by the serving processes of one MDS_DATA_DIR)."""

    def __init__(self, root: Path):
        self.root = root

    def link(self, record: ModelRecord, folder: Path) -> Path | None:
        """The copy's model file, linked into the model `folder`; None when the host has no copy yet."""
        links = folder / LINKS
        if (links / DATA_FILE).exists():
            return links / MAIN_FILE
        copy = self.root / digest(record)
        partial = folder / f".{LINKS}.{uuid.uuid4().hex}.part"
        try:
            partial.mkdir()
            for name in (MAIN_FILE, DATA_FILE):
                os.link(copy / name, partial / name)
            partial.rename(links)
        except FileNotFoundError:  # no copy, or released meanwhile
            return None
        except OSError:  # another load linked it first
            if not (links / DATA_FILE).exists():
                raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return links / MAIN_FILE

    async def make(self, record: ModelRecord, folder: Path, run_helper) -> Path | None:
        """The version's copy, linked into its model `folder` as `link` does, made first with
        `run_helper(write_copy, model file, copy folder)` when the host has none; one process at a time makes a
        given copy, the others wait for it. None: the copy went before the folder linked it."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = digest(record)
        lock = await _lock(self.root / f".{name}.lock")
        try:
            if not (self.root / name).exists():
                partial = self.root / f".{name}.{uuid.uuid4().hex}.part"
                partial.mkdir()
                try:
                    await run_helper(write_copy, folder / MAIN_FILE, partial)
                    try:
                        partial.rename(self.root / name)
                    except OSError:  # made meanwhile by a process that locked a newer lock file (see release)
                        if not (self.root / name).exists():
                            raise
                finally:
                    shutil.rmtree(partial, ignore_errors=True)
            return await asyncio.to_thread(self.link, record, folder)  # under the lock: release cannot intervene
        finally:
            os.close(lock)

    def release(self) -> None:
        """Remove the copies no model folder links any more (a process needing one then makes it again); a
        copy being made or linked (its lock taken) stays."""
        for copy in self.root.glob("[0-9a-f]*"):
            with contextlib.suppress(FileNotFoundError):
                if (copy / DATA_FILE).stat().st_nlink == 1:
                    self._remove_unless_locked(copy)

    def remove_partial(self) -> None:
        """Remove the copies a process ended before it finished making them (at start-up only)."""
        for partial in self.root.glob(".*.part"):
            shutil.rmtree(partial, ignore_errors=True)

    def _remove_unless_locked(self, copy: Path) -> None:
        lock = self.root / f".{copy.name}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if (copy / DATA_FILE).stat().st_nlink == 1:  # still, now that nothing can link it
                shutil.rmtree(copy, ignore_errors=True)
                lock.unlink(missing_ok=True)
        except BlockingIOError:
            pass  # being made or linked
        finally:
            os.close(fd)


async def _lock(path: Path) -> int:
    """An exclusive lock on `path` (a descriptor to close), waited for in a thread that never delays an exit."""
    loop = asyncio.get_running_loop()
    taken: asyncio.Future[int] = loop.create_future()

    def hand_over(fd: int) -> None:
        if taken.cancelled():
            os.close(fd)
        else:
            taken.set_result(fd)

    def take() -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            loop.call_soon_threadsafe(hand_over, fd)
        except RuntimeError:  # the loop closed meanwhile
            os.close(fd)

    threading.Thread(target=take, name="prepacked-lock", daemon=True).start()
    return await taken
