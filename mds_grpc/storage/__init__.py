"""Where models and jobs live: a blob store for files, and metadata and job stores for records."""

from mds_grpc.config import Settings
from mds_grpc.core.stores import BlobStore, JobStore, MetadataStore, Storage


def open_storage(settings: Settings) -> Storage:
    """MongoDB when MDS_MONGO_URI is set and S3 when MDS_S3_ENDPOINT is; else the embedded default."""
    metadata: MetadataStore
    jobs: JobStore
    blobs: BlobStore
    if settings.mongo_uri:
        from mds_grpc.storage.mongo_jobs import MongoJobStore
        from mds_grpc.storage.mongo_metadata import MongoConnection, MongoMetadataStore

        connection = MongoConnection(settings.mongo_uri, settings.mongo_database)
        metadata, jobs = MongoMetadataStore(connection), MongoJobStore(connection)
    else:
        from mds_grpc.storage.sqlite_jobs import SqliteJobStore
        from mds_grpc.storage.sqlite_metadata import SqliteMetadataStore

        database = settings.data_dir / "mds.sqlite3"
        metadata, jobs = SqliteMetadataStore(database), SqliteJobStore(database)
    if settings.s3_endpoint:
        from mds_grpc.storage.s3_blobs import S3BlobStore

        blobs = S3BlobStore(
            settings.s3_endpoint,
            settings.s3_access_key,
            settings.s3_secret_key,
            settings.s3_bucket,
            settings.s3_secure,
            settings.s3_region,
        )
    else:
        from mds_grpc.storage.local_blobs import LocalBlobStore

        blobs = LocalBlobStore(settings.data_dir / "blobs")
    return Storage(metadata, blobs, jobs)
