"""The core's ports: the store interfaces every storage backend (mds_grpc/storage) implements, and the trio of them."""

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from mds_grpc.core.alias_records import AliasEvent, AliasRecord
from mds_grpc.core.auth import ApiKey
from mds_grpc.core.job_records import JobInputRecord, JobRecord, JobResult, JobState
from mds_grpc.core.records import ModelRecord


class BlobUpload(Protocol):
    """A blob streamed to its store while it arrives; published under its hash once known."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None:
        """No more bytes: send what is left and free what the upload held (commit closes, too)."""

    def commit(self, sha256: str) -> bool:
        """Publish under `sha256`, without copying the bytes already sent; False when that blob already existed."""

    def abort(self) -> None:
        """Leave nothing behind (safe after commit, too)."""


class BlobStore(Protocol):
    """Immutable files addressed by their hex SHA-256."""

    def put_file(self, path: Path, sha256: str) -> bool:
        """Publish a fully written local file under `sha256`; False when it was already there."""

    def open_upload(self) -> "BlobUpload | None":
        """A blob written while it is received, or None when put_file costs no more (a local folder)."""

    def fetch_to(self, sha256: str, dest: Path) -> None:
        """Place the blob's bytes at `dest` (which must not exist yet)."""

    def delete(self, sha256: str) -> None:
        """Remove a blob; a missing blob is not an error."""

    def exists(self, sha256: str) -> bool: ...

    def list_blobs(self, older_than: datetime) -> list[str]:
        """The blobs last written before `older_than`."""

    def sweep_partial(self, older_than: datetime) -> list[str]:
        """Remove what interrupted writes left before `older_than`; returns what was removed."""

    def ping(self) -> None:
        """Raise Unavailable when the store cannot be reached."""


class MetadataStore(Protocol):
    """Model records keyed by (name, version)."""

    def create(self, record: ModelRecord) -> ModelRecord:
        """Store `record` under the next version of its name, allocated atomically.

        Versions are never reused, even after the versions before them are deleted.
        """

    def get(self, name: str, version: int) -> ModelRecord | None:
        """One version, or the latest when `version` is 0; None when absent."""

    def list_page(self, name: str | None, after: tuple[str, int] | None, limit: int) -> list[ModelRecord]:
        """Up to `limit` records ordered by (name, version), strictly after `after`."""

    def delete(self, name: str, version: int) -> list[ModelRecord]:
        """Delete one version, or all when `version` is 0; returns the deleted records by version."""

    def blob_in_use(self, sha256: str) -> bool:
        """Whether any stored record references the blob."""

    def referenced_blobs(self) -> set[str]:
        """Every blob a stored record references."""

    # Blob guards: one atomic record per blob orders publishes and deletions across processes.
    # A publish claims each blob before storing it and releases it once its record exists; a
    # deletion starts only while no claim holds the blob, and no claim is taken while it runs.

    def claim_blob(self, sha256: str, deletions_stale_before: datetime) -> bool:
        """Pin the blob for a publish in flight; False while a deletion started after the cutoff holds it."""

    def release_blob(self, sha256: str) -> None:
        """Drop one claim."""

    def begin_blob_deletion(
        self, sha256: str, token: str, claims_stale_before: datetime, deletions_stale_before: datetime
    ) -> bool:
        """Mark the blob as being deleted under `token`; False while a claim or another deletion holds it.

        Claims and deletions taken before their cutoff count as abandoned by a crashed process.
        """

    def end_blob_deletion(self, sha256: str, token: str) -> None:
        """Drop the deletion mark `token` set (a no-op when a claim took over a stale mark)."""

    def set_alias(self, alias: AliasRecord, who: str) -> AliasRecord:
        """Create or move an alias (updated_at: now) and append a "set" event to its history; the alias as stored."""

    def get_alias(self, model: str, alias: str) -> AliasRecord | None: ...

    def list_aliases(self, model: str) -> list[AliasRecord]:
        """Every alias of `model`, by alias name."""

    def delete_alias(self, model: str, alias: str, who: str) -> AliasRecord | None:
        """Remove an alias and append a "delete" event; the alias as it was, or None when there was none."""

    def alias_history(self, model: str, alias: str) -> list[AliasEvent]:
        """Every change of the alias, oldest first (kept after the alias or the model is deleted)."""

    def create_key(self, key: ApiKey) -> None: ...

    def get_key(self, key_id: str) -> ApiKey | None: ...

    def list_keys(self) -> list[ApiKey]: ...

    def revoke_key(self, key_id: str) -> bool:
        """Mark a key revoked; False when there is no such key."""

    def ping(self) -> None:
        """Raise Unavailable when the store cannot be reached."""


class JobStore(Protocol):
    """Job inputs and jobs; every state change is conditional, so concurrent workers agree."""

    def create_input(self, record: JobInputRecord) -> None: ...

    def get_input(self, input_id: str) -> JobInputRecord | None: ...

    def create(self, job: JobRecord) -> None: ...

    def get(self, job_id: str) -> JobRecord | None: ...

    def list_page(
        self, state: JobState | None, model: str | None, after: tuple[datetime, str] | None, limit: int
    ) -> list[JobRecord]:
        """Newest first (created_at, then id, descending), strictly after `after`."""

    def transition(
        self, job_id: str, sources: Collection[JobState], target: JobState, error: str = ""
    ) -> JobRecord | None:
        """Move the job to `target` if it is in one of `sources`; None (and no change) otherwise."""

    def count(self, state: JobState) -> int:
        """How many jobs are in `state` (QUEUED: the queue's depth)."""

    def referenced_blobs(self) -> set[str]:
        """Every blob a job input or job result references."""

    def blob_in_use(self, sha256: str) -> bool:
        """Whether a job input or job result references the blob."""

    def record_batch(self, job_id: str, result: JobResult) -> JobRecord | None:
        """Append `result` if the job is RUNNING with rows_done == result.offset (exactly once).

        Returns the updated job, or None when the condition did not hold.
        """

    def ping(self) -> None:
        """Raise Unavailable when the store cannot be reached."""


@dataclass(frozen=True)
class Storage:
    metadata: MetadataStore
    blobs: BlobStore
    jobs: JobStore

    def ping(self) -> None:
        """Raise Unavailable naming the first backend that cannot be reached."""
        self.metadata.ping()
        self.blobs.ping()
