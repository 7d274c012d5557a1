"""Blob store on S3 or MinIO (the `minio` client): objects at BUCKET/sha256/<sha>.

A model upload streams to the bucket while it arrives (a multipart upload to
`incoming/<id>`, two parts in memory at most); once its hash is known and the model
is valid it is copied to its content address. Other blobs are uploaded from a file,
multipart too. A failed multipart upload is aborted, so no partial object is ever visible.
"""

import io
import queue
import threading
import uuid
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import urllib3
from minio import Minio
from minio.commonconfig import CopySource
from minio.datatypes import Part
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError

from mds_grpc.core.errors import Unavailable

PART_BYTES = 8 << 20  # S3 allows 10,000 parts: objects up to 80 GiB
PARTS_IN_MEMORY = 2  # one part is sent while the next one fills
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
    """One file on its way to the bucket while it is still being received.

    Received bytes are copied into a part buffer; a full one goes to a thread that sends it as the next
    part of a multipart upload while the next buffer fills. At most PARTS_IN_MEMORY buffers exist, made
    once and reused, so an upload holds at most that much memory whatever its size. (minio's put_object, its only
    public multipart call, makes three fresh copies of every part, and glibc kept the freed ones: the
    server grew by about 90 MiB during a 1 GiB upload. The multipart calls it uses are private, hence the
    exact pin of minio.) A file that fits in one part is sent with put_object.
    """

    def __init__(self, store: "S3BlobStore"):
        self.store = store
        self.key = f"incoming/{uuid.uuid4().hex}"
        self.error: BaseException | None = None
        self._buffers = 0  # made so far
        self._free: queue.Queue[bytearray] = queue.Queue()  # buffers sent, to be filled again
        self._full: queue.Queue = queue.Queue()  # (buffer, bytes in it, whether it is the last part), or an error
        self._buffer = self._take_buffer()
        self._filled = 0
        self.thread = threading.Thread(target=self._upload, daemon=True)
        self.thread.start()

    def _take_buffer(self) -> bytearray:
        if self._buffers < PARTS_IN_MEMORY:
            self._buffers += 1
            return bytearray()  # grows as it fills: a small file takes only its own size
        while True:
            if self.error is not None:
                raise self.error
            try:
                return self._free.get(timeout=0.5)
            except queue.Empty:
                continue

    def _upload(self) -> None:
        client, bucket, upload_id = self.store.client, self.store.bucket, None
        try:
            with self.store._reachable():
                parts: list[Part] = []
                while True:
                    item = self._full.get()
                    if isinstance(item, BaseException):
                        raise item
                    buffer, size, last = item
                    data = memoryview(buffer)[:size]
                    if last and not parts:
                        client.put_object(bucket, self.key, io.BytesIO(data), size)
                        return
                    if upload_id is None:
                        upload_id = client._create_multipart_upload(bucket, self.key, {})
                    etag = client._upload_part(bucket, self.key, data, None, upload_id, len(parts) + 1)  # type: ignore[arg-type]
                    parts.append(Part(len(parts) + 1, etag))
                    self._free.put(buffer)
                    if last:
                        client._complete_multipart_upload(bucket, self.key, upload_id, parts)
                        return
        except BaseException as error:  # kept for write() and commit()
            self.error = error
            if upload_id is not None:
                try:
                    client._abort_multipart_upload(bucket, self.key, upload_id)
                except Exception:  # best effort, as put_object's own abort
                    pass

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.error is not None:
                raise self.error
            if self._filled == PART_BYTES:  # more is coming: this part is not the last
                self._full.put((self._buffer, PART_BYTES, False))
                self._buffer, self._filled = self._take_buffer(), 0
            size = min(len(view), PART_BYTES - self._filled)
            self._buffer[self._filled : self._filled + size] = view[:size]  # in place, or growing a new buffer
            self._filled += size
            view = view[size:]

    def commit(self, sha256: str) -> bool:
        """Finish the upload and publish it under `sha256`; False when that blob already existed."""
        self._full.put((self._buffer, self._filled, True))
        self.thread.join()
        if self.error is not None:
            raise self.error
        with self.store._reachable():
            try:
                if self.store._exists(sha256):
                    return False
                self.store.client.copy_object(
                    self.store.bucket, self.store._key(sha256), CopySource(self.store.bucket, self.key)
                )
                return True
            finally:
                self.store.client.remove_object(self.store.bucket, self.key)

    def abort(self) -> None:
        """Abandon the upload: no object remains (called after commit, it only tidies up)."""
        if self.thread.is_alive():
            self._full.put(ConnectionAbortedError("upload abandoned"))
            self.thread.join()
        try:
            with self.store._reachable():
                self.store.client.remove_object(self.store.bucket, self.key)
        except Exception:  # best effort: `incoming/` holds nothing a completed upload needs
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
        http = urllib3.PoolManager(timeout=timeout, retries=urllib3.Retry(total=1, backoff_factor=0.2), maxsize=16)
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

    @staticmethod
    def _key(sha256: str) -> str:
        return f"sha256/{sha256}"

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
            try:
                self.client.fget_object(self.bucket, self._key(sha256), str(dest))
            except S3Error as error:
                if error.code == "NoSuchKey":
                    raise FileNotFoundError(f"blob {sha256} is missing from bucket {self.bucket}") from None
                raise

    def delete(self, sha256: str) -> None:
        with self._reachable():
            self.client.remove_object(self.bucket, self._key(sha256))

    def _exists(self, sha256: str) -> bool:
        try:
            self.client.stat_object(self.bucket, self._key(sha256))
            return True
        except S3Error as error:
            if error.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                return False
            raise

    def exists(self, sha256: str) -> bool:
        with self._reachable():
            return self._exists(sha256)

    def _objects(self, prefix: str, older_than: datetime) -> list[str]:
        with self._reachable():
            return [
                o.object_name
                for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
                if o.last_modified < older_than
            ]

    def list_blobs(self, older_than: datetime) -> list[str]:
        return [name.removeprefix("sha256/") for name in self._objects("sha256/", older_than)]

    def sweep_partial(self, older_than: datetime) -> list[str]:
        """Objects of uploads that were complete but never published (their server died in between)."""
        removed = self._objects("incoming/", older_than)
        with self._reachable():
            for name in removed:
                self.client.remove_object(self.bucket, name)
        return removed

    def ping(self) -> None:
        with self._reachable():
            self.client.bucket_exists(self.bucket)
