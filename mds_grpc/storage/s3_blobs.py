"""Blob store on S3 or MinIO (the `minio` client): objects at BUCKET/sha256/<sha>.

Uploads are multipart and streamed from the staged file (bounded memory); a failed
multipart upload is aborted by the client, so no partial object is ever visible.
"""

from contextlib import contextmanager
from pathlib import Path

import urllib3
from minio import Minio
from minio.error import S3Error

from mds_grpc.core.errors import Unavailable

PART_BYTES = 16 << 20


class S3BlobStore:
    def __init__(self, endpoint: str, access_key: str, secret_key: str, bucket: str, secure: bool = False,
                 region: str | None = None, timeout_seconds: float = 5.0):
        timeout = urllib3.Timeout(connect=timeout_seconds, read=60)
        http = urllib3.PoolManager(timeout=timeout, retries=urllib3.Retry(total=1, backoff_factor=0.2),
                                   maxsize=16)
        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure,
                            region=region or None, http_client=http)
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
        except (urllib3.exceptions.HTTPError, OSError) as error:
            if isinstance(error, FileNotFoundError):
                raise
            reason = str(error).split(" (Caused by")[0][:200]
            raise Unavailable(f"object store at {self.endpoint} is unreachable ({reason}); retry when it is back") from None

    @staticmethod
    def _key(sha256: str) -> str:
        return f"sha256/{sha256}"

    def put_file(self, path: Path, sha256: str) -> bool:
        with self._reachable():
            if self._exists(sha256):
                return False
            self.client.fput_object(self.bucket, self._key(sha256), str(path), part_size=PART_BYTES)
            return True

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

    def ping(self) -> None:
        with self._reachable():
            self.client.bucket_exists(self.bucket)
