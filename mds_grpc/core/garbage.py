"""Deleting blobs safely across processes, and collecting what failures leave behind.

Blobs are content-addressed and shared by every record with the same bytes, so a blob is
deleted only under a deletion mark in the metadata store (see MetadataStore.claim_blob):
while the mark is held no publish can claim the blob, and a publish that claimed it first
keeps it. A publish waits for a deletion in progress, then stores the blob again. Model
uploads, job inputs and job results all write blobs through store_and_record.
"""

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from mds_grpc.core.stores import BlobStore, JobStore, MetadataStore, Storage

log = logging.getLogger("mds.gc")

CLAIM_LEASE = timedelta(hours=1)  # longer than any publish: an older claim was left by a crashed process
DELETION_LEASE = timedelta(minutes=10)  # an older deletion mark was left by a crash, and a claim takes it over
CLAIM_RETRY_SECONDS = 0.05  # how often a write retries a blob another process is deleting
T = TypeVar("T")


def store_and_record(
    metadata: MetadataStore,
    blobs: BlobStore,
    writes: Sequence[tuple[str, Callable[[], bool]]],
    record: Callable[[], T],
    jobs: JobStore | None = None,
) -> T:
    """Run each (sha256, write) — a write returns True when it created the blob — then `record()`.

    Every blob is claimed throughout, so no deletion races it. When anything fails, the blobs this
    call created are deleted again unless a record (in `jobs` too, when given) uses them by then.
    Returns what `record` returns.
    """
    held: list[str] = []
    created: list[str] = []
    try:
        for sha256 in dict.fromkeys(sha256 for sha256, _ in writes):
            while not metadata.claim_blob(sha256, datetime.now(UTC) - DELETION_LEASE):
                time.sleep(CLAIM_RETRY_SECONDS)  # another process is deleting it: store it again after
            held.append(sha256)
        for sha256, write in writes:
            if write():
                created.append(sha256)
        return record()
    except BaseException:
        _release(metadata, held)
        held = []
        delete_if_possible(metadata, blobs, created, jobs)
        raise
    finally:
        _release(metadata, held)


def _release(metadata: MetadataStore, sha256s: list[str]) -> None:
    """Release claims; one that cannot be released now only delays deleting its blob (see CLAIM_LEASE)."""
    for sha256 in sha256s:
        try:
            metadata.release_blob(sha256)
        except Exception as error:
            log.warning("blob claim left to expire", extra={"sha256": sha256, "error": str(error)})


def delete_unreferenced(
    metadata: MetadataStore,
    blobs: BlobStore,
    sha256: str,
    claims_stale_before: datetime | None = None,
    jobs: JobStore | None = None,
) -> bool:
    """Delete the blob unless a record (in `jobs` too, when given) references it or a write holds it;
    True when deleted."""
    token = uuid.uuid4().hex
    now = datetime.now(UTC)
    if not metadata.begin_blob_deletion(sha256, token, claims_stale_before or now - CLAIM_LEASE, now - DELETION_LEASE):
        return False
    give_up = time.monotonic() + DELETION_LEASE.total_seconds() / 2  # well before a claim may take the mark over
    try:
        in_use = metadata.blob_in_use(sha256) or jobs is not None and jobs.blob_in_use(sha256)
        if in_use or time.monotonic() > give_up:
            return False
        blobs.delete(sha256)
        return True
    finally:
        metadata.end_blob_deletion(sha256, token)


def delete_if_possible(metadata: MetadataStore, blobs: BlobStore, sha256s, jobs: JobStore | None = None) -> None:
    """delete_unreferenced for each blob, leaving any that cannot be reached now to `mds gc`."""
    for sha256 in sha256s:
        try:
            delete_unreferenced(metadata, blobs, sha256, jobs=jobs)
        except Exception as error:  # the record change is already made; the blob is only garbage now
            log.warning("blob left for mds gc", extra={"sha256": sha256, "error": str(error)})


def collect_garbage(storage: Storage, grace_seconds: float) -> dict[str, list[str]]:
    """Remove unreferenced blobs and partial writes older than `grace_seconds` (uploads in flight are younger).

    Returns what was removed.
    """
    started = datetime.now(UTC)
    cutoff = started - timedelta(seconds=grace_seconds)
    partial = storage.blobs.sweep_partial(cutoff)
    candidates = storage.blobs.list_blobs(cutoff)
    referenced = storage.metadata.referenced_blobs() | storage.jobs.referenced_blobs()
    orphans = [
        sha
        for sha in candidates
        if sha not in referenced
        and delete_unreferenced(storage.metadata, storage.blobs, sha, min(cutoff, started), storage.jobs)
    ]
    return {"orphan_blobs": orphans, "partial_writes": partial}
