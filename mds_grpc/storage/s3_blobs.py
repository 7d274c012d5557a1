"""Blob store on S3 or MinIO (the `minio` client): objects at BUCKET/sha256/<sha>.

A model upload streams to the bucket while it arrives (a multipart upload to
`incoming/<id>`, at most a few parts in memory); once its hash is known and the model
is valid it is copied to its content address. Other blobs are uploaded from a file,
multipart too. A failed multipart upload is aborted, so no partial object is ever visible.
"""

import queue
import threading
import uuid
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import urllib3
from minio import Minio
from minio.commonconfig import CopySource
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError

from mds_grpc.core.errors import Unavailable

PART_BYTES = 8 << 20  # S3 allows 10,000 parts: objects up to 80 GiB; the client holds about 2 parts in memory
PIPE_CHUNKS = 8  # chunks buffered between the upload stream and the multipart upload
# Answers of a store that is starting, stopping or overloaded (besides any 5xx status): retry later.
TRANSIENT_CODES = {"ClientDisconnected", "RequestTimeout", "SlowDown", "XMinioServerNotInitialized"}


_END = object()


def _transient(error: MinioException) -> bool:
    """Whether an answer of the store means it cannot serve now, rather than that the request is wrong."""
    if isinstance(error, ServerError):
        return True
    if isinstance(error, InvalidResponseError):  # a non-XML answer, e.g. from a proxy in front
        return error._code >= 500
    return isinstance(error, S3Error) and (error.code in TRANSIENT_CODES or error.response.status >= 500)


class _Pipe:
    """A file-like reader fed by writes from another thread; closing with an error fails the reader."""

    def __init__(self):
        self._chunks: queue.Queue = queue.Queue(maxsize=PIPE_CHUNKS)
        self._buffer = bytearray()
        self._done = False
        self.reader_gone = threading.Event()  # set when the reading thread stops, so writers never block forever

    def write(self, data: bytes) -> None:
        if data:
            self._put(data)

    def close(self, error: BaseException | None = None) -> None:
        self._put(error or _END)

    def _put(self, item) -> None:
        while not self.reader_gone.is_set():
            try:
                self._chunks.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def read(self, size: int = -1) -> bytes:
        while not self._done and (size < 0 or len(self._buffer) < size):
            item = self._chunks.get()
            if isinstance(item, BaseException):
                raise item
            if item is _END:
                self._done = True
            else:
                self._buffer.extend(item)
        size = len(self._buffer) if size < 0 else min(size, len(self._buffer))
        data = bytes(memoryview(self._buffer)[:size])  # one copy, not two
        del self._buffer[:size]
        return data


class S3StreamingUpload:
    """One file on its way to the bucket while it is still being received."""

    def __init__(self, store: "S3BlobStore"):
        self.store = store
        self.key = f"incoming/{uuid.uuid4().hex}"
        self.pipe = _Pipe()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._upload, daemon=True)
        self.thread.start()

    def _upload(self) -> None:
        try:
            with self.store._reachable():
                self.store.client.put_object(
                    self.store.bucket,
                    self.key,
                    self.pipe,  # type: ignore[arg-type]  # minio only calls read(); it asks for a whole BinaryIO
                    length=-1,
                    part_size=PART_BYTES,
                    num_parallel_uploads=1,
                )
        except BaseException as error:  # kept for commit(); the client has aborted the multipart upload
            self.error = error
        finally:
            self.pipe.reader_gone.set()

    def write(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.pipe.write(data)

    def commit(self, sha256: str) -> bool:
        """Finish the upload and publish it under `sha256`; False when that blob already existed."""
        self.pipe.close()
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
            self.pipe.close(ConnectionAbortedError("upload abandoned"))
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
