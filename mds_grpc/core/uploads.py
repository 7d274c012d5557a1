"""Receiving an upload: its files are streamed to a private temp folder while hashed."""

import asyncio
import bisect
import hashlib
import re
import shutil
import uuid
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from mds_grpc.core.errors import InvalidArgument, ResourceExhausted
from mds_grpc.core.records import MAIN_FILE, BatchingPolicy, Placement, StoredFile
from mds_grpc.core.stores import BlobUpload
from mds_grpc.core.to_the_end import to_the_end

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
PATH_COMPONENT = re.compile(r"[A-Za-z0-9._-]{1,255}")  # 255: the longest file name Linux allows
MAX_PATH_CHARS = 1024  # a side file's whole relative path, well inside PATH_MAX with the server's folders
MAX_SIDE_FILES = 1000  # side files per upload, unless the server says otherwise


@dataclass(frozen=True)
class UploadHeader:
    name: str
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    sha256: str = ""  # of the main file; "" = not verified
    size_bytes: int = 0  # of the main file; 0 = not verified
    external_files: tuple[StoredFile, ...] = ()  # side files, sha256/size optional as above
    batching: BatchingPolicy = BatchingPolicy()
    placement: Placement = Placement()
    # Side files are taken as they arrive, declared or not (an HTTP multipart upload, whose header
    # may come after the files or not at all); declared ones must still arrive and match.
    open_files: bool = False


def sha256_of(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def quoted(text: str, limit: int = 100) -> str:
    """Client text for an error message, cut short: a status message travels in size-limited metadata."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(
            f"invalid model name {quoted(name)}: use 1-128 characters of a-z, 0-9, '.', '_' and '-', "
            "starting with a letter or digit"
        )


def check_relative_path(path: str) -> None:
    """A side-file path must stay inside the model's folder."""
    components = path.split("/")
    if len(path) > MAX_PATH_CHARS or any(c in (".", "..") or not PATH_COMPONENT.fullmatch(c) for c in components):
        raise InvalidArgument(
            f"invalid file path {quoted(path)}: use a relative path of at most "
            f"{MAX_PATH_CHARS} characters, of [A-Za-z0-9._-] components of at most 255, without '..' or a leading '/'"
        )


def _check_sha256(sha256: str, what: str) -> None:
    if sha256 and not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise InvalidArgument(f"sha256 of {what} must be 64 lowercase hex digits, got {quoted(sha256)}")


@dataclass
class _OpenFile:
    path: str
    handle: BinaryIO
    hasher: "hashlib._Hash"
    remote: BlobUpload | None
    size: int = 0


class StagedUpload:
    """One upload's files in `DIR/upload-<id>/`, each written in one contiguous run of chunks."""

    def __init__(
        self,
        tmp_root: Path,
        header: UploadHeader,
        max_bytes: int,
        open_remote: Callable[[], BlobUpload | None] = lambda: None,
        max_side_files: int = MAX_SIDE_FILES,
    ):
        check_name(header.name)
        self.header = header
        self.max_side_files = max_side_files
        self.declared: dict[str, StoredFile] = {}
        self.paths: list[str] = []  # the declared paths, sorted: those inside a folder come together
        self._declare_all(header)
        self.max_bytes = max_bytes
        self.dir = Path(tmp_root) / f"upload-{uuid.uuid4().hex}"
        self.dir.mkdir(parents=True)
        self.received: dict[str, StoredFile] = {}
        self.open_remote = open_remote
        self.remote: dict[str, BlobUpload] = {}  # files also streamed to the blob store as they arrive
        self.total = 0
        self._open: _OpenFile | None = None

    @property
    def main_path(self) -> Path:
        return self.dir / MAIN_FILE

    def _declare_all(self, header: UploadHeader) -> None:
        """Declare the main file and the header's side files; a file that already arrived takes the checks."""
        _check_sha256(header.sha256, MAIN_FILE)
        self.declared[MAIN_FILE] = StoredFile(MAIN_FILE, header.sha256, header.size_bytes)
        listed = {MAIN_FILE}
        for side in header.external_files:
            if side.path in listed:
                raise InvalidArgument(f"file {side.path!r} is declared twice in the header")
            listed.add(side.path)
            _check_sha256(side.sha256, side.path)
            self._declare(side)

    def _declare(self, file: StoredFile) -> None:
        if file.path not in self.declared:
            check_relative_path(file.path)
            if len(self.declared) > self.max_side_files:  # the main file is declared too
                raise ResourceExhausted(
                    f"an upload holds at most {self.max_side_files} side files (MDS_MAX_MODEL_FILES); "
                    f"{quoted(file.path)} would be one more"
                )
            at = bisect.bisect_left(self.paths, file.path + "/")
            if at < len(self.paths) and self.paths[at].startswith(file.path + "/"):
                raise InvalidArgument(
                    f"file {file.path!r} is also used as a folder by another file, {self.paths[at]!r}"
                )
            for end in (i for i, c in enumerate(file.path) if c == "/"):
                if file.path[:end] in self.declared:
                    raise InvalidArgument(
                        f"file {file.path[:end]!r} is also used as a folder by another file, {file.path!r}"
                    )
            bisect.insort(self.paths, file.path)
        self.declared[file.path] = file

    def complete(self, header: UploadHeader) -> None:
        """Take a header that came after some of the files (open_files uploads): it must name the same model."""
        if header.name and header.name != self.header.name:
            raise InvalidArgument(
                f"the header names model {quoted(header.name)}, the upload is for {self.header.name!r}"
            )
        self.header = replace(header, name=self.header.name, open_files=True)
        self._declare_all(self.header)

    def write(self, path: str, data: bytes) -> None:
        if not data:
            return  # an empty chunk carries nothing, and must not end a stream early
        if path not in self.declared:
            if not self.header.open_files:
                raise InvalidArgument(f"chunk for undeclared file {quoted(path)}: list it in header.external_files")
            self._declare(StoredFile(path, "", 0))
        if self._open is None or self._open.path != path:
            if path in self.received:
                raise InvalidArgument(f"chunks of file {path!r} must be contiguous; it was already finished")
            self._close()
            target = self.dir / path
            target.parent.mkdir(parents=True, exist_ok=True)
            self._open = _OpenFile(path, open(target, "xb"), hashlib.sha256(), self.open_remote())
            if self._open.remote is not None:
                self.remote[path] = self._open.remote
        self.total += len(data)
        if self.total > self.max_bytes:
            raise ResourceExhausted(f"upload exceeds the server's model size limit of {self.max_bytes} bytes")
        self._open.handle.write(data)
        self._open.hasher.update(data)
        if self._open.remote is not None:
            self._open.remote.write(data)
        self._open.size += len(data)

    def _close(self) -> None:
        if self._open is not None:
            self._open.handle.close()
            if self._open.remote is not None:
                self._open.remote.close()  # its part buffers go now, not at the commit
            self.received[self._open.path] = StoredFile(self._open.path, self._open.hasher.hexdigest(), self._open.size)
            self._open = None

    def finish(self) -> tuple[StoredFile, ...]:
        """Close the last file and check every file against its declaration; main file first."""
        self._close()
        for path, want in self.declared.items():
            got = self.received.get(path)
            if got is None or got.size_bytes == 0:
                raise InvalidArgument(f"no bytes received for file {path!r}")
            if want.size_bytes and want.size_bytes != got.size_bytes:
                raise InvalidArgument(
                    f"size mismatch for {path!r}: header says {want.size_bytes} bytes, received {got.size_bytes}"
                )
            if want.sha256 and want.sha256 != got.sha256:
                raise InvalidArgument(
                    f"sha256 mismatch for {path!r}: header says {want.sha256}, received bytes hash to {got.sha256}"
                )
        return tuple(self.received[path] for path in self.declared)

    def cleanup(self) -> None:
        if self._open is not None:
            self._open.handle.close()
            self._open = None
        for upload in self.remote.values():
            upload.abort()
        shutil.rmtree(self.dir, ignore_errors=True)


async def receive(
    staging: StagedUpload, parts: AsyncIterable[tuple[str, bytes] | UploadHeader]
) -> tuple[StoredFile, ...]:
    """Write every (path, bytes) part off the event loop; a cancelled receive lets the last write finish.

    An UploadHeader among the parts completes the staging's header (StagedUpload.complete).
    """
    async for part in parts:
        if isinstance(part, UploadHeader):
            staging.complete(part)
            continue
        await to_the_end(asyncio.to_thread(staging.write, *part))
    return await to_the_end(asyncio.to_thread(staging.finish))
