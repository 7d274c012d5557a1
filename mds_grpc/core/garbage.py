"""Collecting what failures leave behind: blobs no record references, and interrupted writes."""

from datetime import datetime, timedelta, timezone

from mds_grpc.storage import Storage


def collect_garbage(storage: Storage, grace_seconds: float) -> dict[str, list[str]]:
    """Remove unreferenced blobs and partial writes older than `grace_seconds` (uploads in flight are younger).

    Returns what was removed.
    """
    cutoff = datetime.now(timezone.utc) - timedelta(seconds=grace_seconds)
    partial = storage.blobs.sweep_partial(cutoff)
    candidates = storage.blobs.list_blobs(cutoff)
    referenced = storage.metadata.referenced_blobs() | storage.jobs.referenced_blobs()
    orphans = [sha for sha in candidates if sha not in referenced]
    for sha in orphans:
        storage.blobs.delete(sha)
    return {"orphan_blobs": orphans, "partial_writes": partial}
