"""Where models live: a blob store for files and a metadata store for records."""

from mds_grpc.config import Settings
from mds_grpc.storage.base import BlobStore, MetadataStore


def open_metadata_store(settings: Settings) -> MetadataStore:
    """MongoDB when MDS_MONGO_URI is set, else SQLite under the data folder."""
    if settings.mongo_uri:
        from mds_grpc.storage.mongo_metadata import MongoMetadataStore

        return MongoMetadataStore(settings.mongo_uri, settings.mongo_database)
    from mds_grpc.storage.sqlite_metadata import SqliteMetadataStore

    return SqliteMetadataStore(settings.data_dir / "mds.sqlite3")


def open_blob_store(settings: Settings) -> BlobStore:
    """S3/MinIO when MDS_S3_ENDPOINT is set, else a folder under the data folder."""
    if settings.s3_endpoint:
        from mds_grpc.storage.s3_blobs import S3BlobStore

        return S3BlobStore(settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key,
                           settings.s3_bucket, settings.s3_secure, settings.s3_region)
    from mds_grpc.storage.local_blobs import LocalBlobStore

    return LocalBlobStore(settings.data_dir / "blobs")
