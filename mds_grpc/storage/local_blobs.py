"""Blob store on the local filesystem: DIR/sha256/ab/abcdef..., files read-only."""

import errno
import os
import shutil
import uuid
from datetime import datetime
from pathlib import Path

from mds_grpc.core.errors import Unavailable


def _link_or_copy(source: Path, dest: Path) -> None:
    """Hard-link `source` to `dest`, copying (then renaming) across filesystems."""
    try:
        os.link(source, dest)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        partial = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
        shutil.copyfile(source, partial)
        os.chmod(partial, 0o444)
        try:
            os.link(partial, dest)  # like the fast path: FileExistsError when dest is already there
        finally:
            partial.unlink()


class LocalBlobStore:
    def __init__(self, root: Path):
        self.root = Path(root) / "sha256"
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def put_file(self, path: Path, sha256: str) -> bool:
        final = self._path(sha256)
        final.parent.mkdir(exist_ok=True)
        os.chmod(path, 0o444)
        try:
            _link_or_copy(path, final)
        except FileExistsError:
            return False  # content-addressed: the same bytes are already there
        return True

    def open_upload(self) -> None:
        return None  # staged files are published by a hard link: nothing to stream

    def fetch_to(self, sha256: str, dest: Path) -> None:
        _link_or_copy(self._path(sha256), dest)

    def delete(self, sha256: str) -> None:
        self._path(sha256).unlink(missing_ok=True)

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).exists()

    def _files(self, pattern: str, older_than: datetime) -> list[Path]:
        cutoff = older_than.timestamp()
        return [p for p in self.root.glob(f"*/{pattern}") if p.stat().st_mtime < cutoff]

    def list_blobs(self, older_than: datetime) -> list[str]:
        return [p.name for p in self._files("[0-9a-f]*", older_than)]

    def sweep_partial(self, older_than: datetime) -> list[str]:
        removed = self._files(".*.part", older_than)
        for path in removed:
            path.unlink(missing_ok=True)
        return [p.name for p in removed]

    def ping(self) -> None:
        if not self.root.is_dir():
            raise Unavailable(f"blob folder {self.root} is missing")
