"""Model versions: upload, look up, list and delete, over a blob store and a metadata store."""

import asyncio
import shutil
from collections.abc import AsyncIterable
from functools import partial
from pathlib import Path

from mds_grpc.core.batching import check_policy
from mds_grpc.core.errors import InvalidArgument, NotFound
from mds_grpc.core.garbage import delete_if_possible, store_and_record
from mds_grpc.core.model_cache import LoadedModel, ModelCache
from mds_grpc.core.pages import decode_token, encode_token, page_limit
from mds_grpc.core.records import ModelRecord, utc_now
from mds_grpc.core.stores import BlobStore, MetadataStore
from mds_grpc.core.to_the_end import to_the_end
from mds_grpc.core.uploads import MAX_SIDE_FILES, StagedUpload, UploadHeader, receive
from mds_grpc.core.validation import Validator

# Models up to this size are warmed by their upload. Bigger ones are checked with a lean session and
# loaded on first use; so is any model checked in a helper process (see Validator), so an upload's
# memory stays flat whatever the model's size.
WARM_MAX_BYTES = 64 << 20


class ModelRegistry:
    def __init__(
        self,
        metadata: MetadataStore,
        blobs: BlobStore,
        cache: ModelCache,
        tmp_dir: Path,
        max_model_bytes: int,
        resolve_ttl: float = 1.0,
        warm_max_bytes: int = WARM_MAX_BYTES,
        max_side_files: int = MAX_SIDE_FILES,
        validator: Validator | None = None,
    ):
        self.metadata = metadata
        self.blobs = blobs
        self.cache = cache
        self.tmp_dir = Path(tmp_dir)
        self.max_model_bytes = max_model_bytes
        self.resolve_ttl = resolve_ttl
        self.warm_max_bytes = warm_max_bytes
        self.max_side_files = max_side_files
        self.validator = validator or Validator(intra_op_threads=cache.intra_op_threads)

    def sweep_local_copies(self) -> None:
        """Remove uploads a crash left behind and model folders of an earlier process (call before serving)."""
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.cache.clear_folders()

    async def upload(self, header: UploadHeader, parts: AsyncIterable[tuple[str, bytes] | UploadHeader]) -> ModelRecord:
        """Stage, validate, publish and warm a new version; nothing stays behind on failure.

        `parts` are (file path, bytes); an UploadHeader among them completes `header` (see uploads.receive).
        """
        self.cache.placer.check(header.placement)  # before any byte is taken, when the header comes first
        staging = StagedUpload(self.tmp_dir, header, self.max_model_bytes, self.blobs.open_upload, self.max_side_files)
        handed_over = False
        try:
            files = await receive(staging, parts)
            header = staging.header
            side_files = {stored.path for stored in files[1:]}
            self.cache.placer.check(header.placement)  # an HTTP upload's header may come after the files
            # The check runs on the CPU: its session serves only a version that runs there.
            warm = sum(stored.size_bytes for stored in files) <= self.warm_max_bytes
            warm = warm and not self.cache.placer.on_gpu(header.placement)
            # nor one whose weights the cache maps from their files (the check prepacks them)
            warm = warm and sum(stored.size_bytes for stored in files[1:]) < self.cache.shared_weights_min_bytes
            session, info = await self.validator.inspect(staging.main_path, side_files, warm)
            draft = ModelRecord(
                name=header.name,
                version=0,
                created_at=utc_now(),
                files=files,
                inputs=info.inputs,
                outputs=info.outputs,
                opsets=info.opsets,
                producer_name=info.producer_name,
                producer_version=info.producer_version,
                ir_version=info.ir_version,
                description=header.description,
                labels=dict(header.labels),
                metadata=dict(header.metadata),
                batching=header.batching,
                placement=header.placement,
            )
            check_policy(draft.batching, draft.inputs, draft.outputs)
            # Once the client has sent everything and the model is valid, finish even if it leaves:
            # the publishing task owns the staging folder from here on, cleanup included.
            publishing = asyncio.ensure_future(self._publish_and_warm(staging, draft, session if warm else None))
            handed_over = True
            return await asyncio.shield(publishing)
        finally:
            if not handed_over:
                await to_the_end(asyncio.to_thread(staging.cleanup))

    async def _publish_and_warm(self, staging: StagedUpload, draft: ModelRecord, session) -> ModelRecord:
        try:
            record = await self._publish(staging, draft)
        finally:
            await asyncio.to_thread(staging.cleanup)
        self.cache.forget_latest(record.name)  # "latest" moves on now, not after the TTL
        if session is not None:
            self.cache.put(record, session)
        return record

    async def _publish(self, staging: StagedUpload, draft: ModelRecord) -> ModelRecord:
        """Store the files (streamed ones are committed) and record the version."""
        writes = []
        for stored in draft.files:
            upload = staging.remote.get(stored.path)
            writes.append(
                (
                    stored.sha256,
                    partial(upload.commit, stored.sha256)
                    if upload is not None
                    else partial(self.blobs.put_file, staging.dir / stored.path, stored.sha256),
                )
            )
        record = await asyncio.to_thread(
            store_and_record, self.metadata, self.blobs, writes, partial(self.metadata.create, draft)
        )
        await asyncio.to_thread(self.cache.adopt_folder, record, staging.dir)
        return record

    @property
    def available_providers(self) -> tuple[str, ...]:
        """The execution providers this server has."""
        return self.cache.placer.available

    def runs_on(self, record: ModelRecord) -> tuple[str, ...]:
        """The execution providers this server runs the version on, preferred first."""
        return self.cache.placer.resolve(record.placement)

    async def get(self, name: str, version: int = 0) -> ModelRecord:
        if version < 0:
            raise InvalidArgument(f"version must be positive, or 0 for the latest; got {version}")
        record = await asyncio.to_thread(self.metadata.get, name, version)
        if record is None:
            what = f"model {name!r} version {version}" if version else f"model {name!r}"
            raise NotFound(f"{what} does not exist")
        return record

    async def load(self, name: str, version: int = 0) -> LoadedModel:
        """The loaded model for (name, version), resolved from metadata at most every `resolve_ttl` seconds.

        Uploads and deletes through this process take effect at once; those made through
        another process sharing the storage, within `resolve_ttl`.
        """
        loaded = self.cache.resolved(name, version)
        if loaded is None:
            loaded = await self.cache.get(await self.get(name, version))
            self.cache.trust(loaded, version, self.resolve_ttl)
        return loaded

    async def list_page(
        self, name: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[ModelRecord], str]:
        limit = page_limit(page_size)
        after = decode_token(page_token, (str, int))
        records = await asyncio.to_thread(self.metadata.list_page, name or None, after, limit + 1)
        if len(records) > limit:
            last = records[limit - 1]
            return records[:limit], encode_token([last.name, last.version])
        return records, ""

    async def delete(self, name: str, version: int = 0) -> list[int]:
        """Delete one version, or every version (0); see Aliases.delete_model for the check of aliases."""
        if version < 0:
            raise InvalidArgument(f"version must be positive, or 0 for every version; got {version}")
        deleted = await asyncio.to_thread(self.metadata.delete, name, version)
        if not deleted:
            what = f"model {name!r} version {version}" if version else f"model {name!r}"
            raise NotFound(f"{what} does not exist")
        files = dict.fromkeys(stored.sha256 for record in deleted for stored in record.files)
        await asyncio.to_thread(delete_if_possible, self.metadata, self.blobs, files)
        versions = [record.version for record in deleted]
        self.cache.forget_latest(name)
        self.cache.forget(name, versions)
        return versions
