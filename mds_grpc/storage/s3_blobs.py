"""Blob store on S3 or MinIO (the `minio` client).

The bucket's layout:

- `sha256/<sha>`: a blob's bytes at its content address. put_file writes there (it is handed a file whose
  hash is known before it is sent), and so did every streamed upload before this layout.
- `uploads/<id>`: the bytes of one streamed file, written under a key of their own while the file arrives
  (a multipart upload, PART_BUFFERS parts in memory at most).
- `links/<sha>/<id>`: an empty object that makes `uploads/<id>` the blob `<sha>`. It is never copied to
  its content address: the link is the map from the hash to the key the bytes were written to.

A blob exists when `sha256/<sha>` does, or a link whose upload does. Three rules keep that safe beside
the claims and deletion marks of the metadata store (core/garbage.py):

1. A commit writes its link before it completes the multipart upload, which is when `uploads/<id>` appears.
   So anyone who can see an upload could already see its link.
2. Only delete() removes a link, and the caller runs it under the blob's deletion mark, while no publish
   holds a claim on the hash. It removes the upload before the link, so an upload is never left unlinked.
3. A link whose upload never appeared (its server died or the store failed in the middle of a commit)
   counts for nothing: a publish of the same bytes stores them again, and the link goes with the next
   delete() of its hash, which `mds gc` runs once no record references the hash.

sweep_partial lists `uploads/` before `links/`, so by (1) an upload it sees without a link lost it to
(2) and is garbage; it also removes the `incoming/` objects that older versions completed before copying.
A multipart upload cut off mid-way is not an object at all: the store expires it (a lifecycle rule on
AWS S3; MinIO drops those older than a day). Objects of earlier versions stay where they are and are found.
"""

import io
import mmap
import queue
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import urllib3
from minio import Minio
from minio.datatypes import Part
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError

from mds_grpc.core.errors import Unavailable

PART_BYTES = 6 << 20  # S3 allows 10,000 parts: files up to 58 GiB (MDS_MAX_MODEL_BYTES is 4 GiB by default)
PART_BUFFERS = 4  # per file being streamed: up to this many parts in flight, while the writer waits for one
PART_SENDERS = 16  # threads sending parts, for all uploads of a store (its connection pool holds as many)
NOT_FOUND = ("NoSuchKey", "NoSuchObject", "ResourceNotFound")
# Answers of a store that is starting, stopping or overloaded (besides any 5xx status): retry later.
TRANSIENT_CODES = {"ClientDisconnected", "RequestTimeout", "SlowDown", "XMinioServerNotInitialized"}


def _transient(error: MinioException) -> bool:
    """Whether an answer of the store means it cannot serve now, rather than that the request is wrong."""
    if isinstance(error, ServerError):
        return True
    if isinstance(error, InvalidResponseError):  # a non-XML answer, e.g. from a proxy in front
        return error._code >= 500
    return isinstance(error, S3Error) and (error.code in TRANSIENT_CODES or error.response.status >= 500)


class S3StreamingUpload:
    """One file on its way to `uploads/<id>` while it is still being received; see the module's layout.

    Received bytes are copied into a part buffer; a full one is sent as the next part of a multipart upload
    by the store's sender threads while the writer fills the next. At most PART_BUFFERS buffers exist, made
    once and reused, so a file holds at most that much memory whatever its size, and none once it is
    closed. The buffers are anonymous memory maps rather than heap blocks: only the pages written take
    memory (a small file costs its size) and they go back to the system when the buffer goes, where glibc
    keeps freed heap blocks for later (with bytearrays, a 300 MiB upload through Envoy grew the server by
    52 to 65 MiB; with maps, by 29 to 42). minio's put_object, its only public multipart call, makes three
    fresh copies of every part; the multipart calls used here are private, hence the exact pin of minio.
    """

    def __init__(self, store: "S3BlobStore"):
        self.store = store
        self.id = uuid.uuid4().hex
        self.key = f"uploads/{self.id}"
        self.error: BaseException | None = None
        self._upload_id: str | None = None
        self._etags: dict[int, str] = {}  # part number: ETag, of the parts sent
        self._sending: list[Future] = []  # one per part, in order
        self._buffers = 0  # made so far
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()  # buffers sent, to be filled again
        self._lock = threading.Lock()  # orders letting the buffers go against senders handing theirs back
        self._keep_buffers = True
        self._buffer: mmap.mmap | None = None
        self._filled = 0
        self._ended = False  # closed or aborted: no more parts
        self._committed = False

    def _take_buffer(self) -> mmap.mmap:
        if self._buffers < PART_BUFFERS:
            self._buffers += 1
            return mmap.mmap(-1, PART_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buffer = self._free.get()  # every buffer in flight comes back, sent or failed
        self._raise_error()
        return buffer

    def _let_buffers_go(self) -> None:
        with self._lock:
            self._keep_buffers = False
            while not self._free.empty():
                self._free.get()

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _send(self, buffer: mmap.mmap, size: int) -> None:
        """Hand `buffer`'s first `size` bytes to a sender as the next part."""
        if self._upload_id is None:
            with self.store._reachable():
                self._upload_id = self.store.client._create_multipart_upload(self.store.bucket, self.key, {})
        number = len(self._sending) + 1
        self._sending.append(self.store._senders().submit(self._send_part, buffer, size, number))

    def _send_part(self, buffer: mmap.mmap, size: int, number: int) -> None:
        try:
            if self.error is None:
                with self.store._reachable():
                    self._etags[number] = self.store.client._upload_part(
                        self.store.bucket,
                        self.key,
                        memoryview(buffer)[:size],  # type: ignore[arg-type]
                        None,
                        self._upload_id,  # type: ignore[arg-type]
                        number,
                    )
        except BaseException as error:  # kept for write(), close() and commit()
            self.error = self.error or error
        finally:
            with self._lock:
                if self._keep_buffers:
                    self._free.put(buffer)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self._raise_error()
            if self._buffer is None:
                self._buffer, self._filled = self._take_buffer(), 0
            size = min(len(view), PART_BYTES - self._filled)
            self._buffer[self._filled : self._filled + size] = view[:size]
            self._filled += size
            view = view[size:]
            if self._filled == PART_BYTES:
                self._send(self._buffer, PART_BYTES)
                self._buffer = None

    def close(self) -> None:
        """No more bytes: send the last part and wait until every part is sent; the buffers go."""
        if self._ended:
            self._raise_error()
            return
        self._ended = True
        try:
            if self._buffer is not None:
                self._send(self._buffer, self._filled)
            elif not self._sending:  # the only part of an empty file
                self._send(self._take_buffer(), 0)
            wait(self._sending)
        except BaseException as error:
            self.error = self.error or error
        finally:
            self._buffer = None
            self._let_buffers_go()
        self._raise_error()

    def commit(self, sha256: str) -> bool:
        """Publish the bytes as blob `sha256`: link, then complete; False when that blob already existed."""
        self.close()
        store, bucket = self.store, self.store.bucket
        with store._reachable():
            if store._exists(sha256):
                self.abort()  # the multipart upload was never completed: nothing of it is visible
                return False
            store.client.put_object(bucket, store._link(sha256, self.id), io.BytesIO(b""), 0)
            parts = [Part(number, etag) for number, etag in sorted(self._etags.items())]
            store.client._complete_multipart_upload(bucket, self.key, self._upload_id, parts)  # type: ignore[arg-type]
            self._committed = True
            return True

    def abort(self) -> None:
        """Abandon the upload: no object remains (called after a commit, it does nothing)."""
        if self._committed:
            return
        self.error = self.error or ConnectionAbortedError("upload abandoned")  # senders skip what is left
        self._ended = True
        self._buffer = None
        wait(self._sending)
        self._let_buffers_go()
        if self._upload_id is not None:
            try:
                with self.store._reachable():
                    self.store.client._abort_multipart_upload(self.store.bucket, self.key, self._upload_id)
                self._upload_id = None
            except Exception:  # best effort: an incomplete multipart upload is no object, and the store expires it
                pass


class S3BlobStore:
    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        secure: bool = False,
        region: str | None = None,
        timeout_seconds: float = 5.0,
    ):
        timeout = urllib3.Timeout(connect=timeout_seconds, read=60)
        http = urllib3.PoolManager(
            timeout=timeout, retries=urllib3.Retry(total=1, backoff_factor=0.2), maxsize=PART_SENDERS
        )
        self.client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region or None,
            http_client=http,
        )
        self.endpoint = endpoint
        self.bucket = bucket
        self._bucket_ready = False
        self._sender_pool: ThreadPoolExecutor | None = None  # made at the first part sent
        self._senders_lock = threading.Lock()

    @contextmanager
    def _reachable(self):
        """Raise Unavailable, naming the backend, when the object store cannot be reached."""
        try:
            if not self._bucket_ready:
                if not self.client.bucket_exists(self.bucket):
                    try:
                        self.client.make_bucket(self.bucket)
                    except S3Error as error:
                        if error.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                            raise
                self._bucket_ready = True
            yield
        except (urllib3.exceptions.HTTPError, OSError, MinioException) as error:
            if isinstance(error, FileNotFoundError) or (isinstance(error, MinioException) and not _transient(error)):
                raise
            reason = str(error).split(" (Caused by")[0][:200]
            raise Unavailable(
                f"object store at {self.endpoint} is unreachable ({reason}); retry when it is back"
            ) from None

    def _senders(self) -> ThreadPoolExecutor:
        with self._senders_lock:
            if self._sender_pool is None:
                self._sender_pool = ThreadPoolExecutor(PART_SENDERS, thread_name_prefix="s3-part")
            return self._sender_pool

    @staticmethod
    def _key(sha256: str) -> str:
        return f"sha256/{sha256}"

    @staticmethod
    def _link(sha256: str, upload_id: str) -> str:
        return f"links/{sha256}/{upload_id}"

    def _linked_uploads(self, sha256: str) -> list[str]:
        """The keys of the uploads linked to `sha256`, whether they appeared or not."""
        links = self.client.list_objects(self.bucket, prefix=f"links/{sha256}/", recursive=True)
        return [f"uploads/{o.object_name.rsplit('/', 1)[-1]}" for o in links]

    def put_file(self, path: Path, sha256: str) -> bool:
        with self._reachable():
            if self._exists(sha256):
                return False
            self.client.fput_object(self.bucket, self._key(sha256), str(path), part_size=PART_BYTES)
            return True

    def open_upload(self) -> S3StreamingUpload:
        return S3StreamingUpload(self)

    def fetch_to(self, sha256: str, dest: Path) -> None:
        with self._reachable():  # fget_object writes a temp file and renames it when complete
            for key in [*self._linked_uploads(sha256), self._key(sha256)]:
                try:
                    self.client.fget_object(self.bucket, key, str(dest))
                    return
                except S3Error as error:
                    if error.code not in NOT_FOUND:
                        raise
            raise FileNotFoundError(f"blob {sha256} is missing from bucket {self.bucket}")

    def delete(self, sha256: str) -> None:
        """Remove every copy of the blob; the caller holds its deletion mark (rule 2 of the layout)."""
        with self._reachable():
            self.client.remove_object(self.bucket, self._key(sha256))
            for key in self._linked_uploads(sha256):
                self.client.remove_object(self.bucket, key)
                self.client.remove_object(self.bucket, self._link(sha256, key.removeprefix("uploads/")))

    def _found(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, key)
            return True
        except S3Error as error:
            if error.code in NOT_FOUND:
                return False
            raise

    def _exists(self, sha256: str) -> bool:
        return self._found(self._key(sha256)) or any(self._found(key) for key in self._linked_uploads(sha256))

    def exists(self, sha256: str) -> bool:
        with self._reachable():
            return self._exists(sha256)

    def _objects(self, prefix: str, older_than: datetime | None = None) -> list[str]:
        with self._reachable():
            return [
                o.object_name
                for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
                if older_than is None or o.last_modified < older_than
            ]

    def list_blobs(self, older_than: datetime) -> list[str]:
        """Blobs at their content address and linked ones (a link whose upload never appeared included)."""
        stored = {name.removeprefix("sha256/") for name in self._objects("sha256/", older_than)}
        linked = {name.split("/")[1] for name in self._objects("links/", older_than)}
        return sorted(stored | linked)

    def sweep_partial(self, older_than: datetime) -> list[str]:
        """Uploads that appeared but are not linked, and what older versions completed but never copied."""
        uploads = self._objects("uploads/", older_than)
        linked = {f"uploads/{name.rsplit('/', 1)[-1]}" for name in self._objects("links/")}  # listed after: rule 1
        removed = [name for name in uploads if name not in linked] + self._objects("incoming/", older_than)
        with self._reachable():
            for name in removed:
                self.client.remove_object(self.bucket, name)
        return removed

    def ping(self) -> None:
        with self._reachable():
            self.client.bucket_exists(self.bucket)
