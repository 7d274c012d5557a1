"""Metadata store on MongoDB (pymongo). Production targets MongoDB; the tests run FerretDB.

Documents: `models` holds one record per (name, version) under a unique index;
`model_names` holds each name's last allocated version, bumped atomically with
find_one_and_update, so several server processes never allocate the same version.
`blob_guards` holds one document per blob being published or deleted (see MetadataStore):
each claim or deletion mark is one conditional upsert, refused by the unique `_id` when its
condition does not hold.
`aliases` holds one document per (model, alias) under a unique index; `alias_events` holds
their history, one document per change, written after the change itself.
"""

import dataclasses
import threading
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pymongo
from pymongo import ReturnDocument, uri_parser
from pymongo.errors import ConnectionFailure, DuplicateKeyError

from mds_grpc.core.alias_records import AliasEvent, AliasRecord
from mds_grpc.core.auth import ApiKey
from mds_grpc.core.errors import Unavailable
from mds_grpc.core.records import ModelRecord, record_from_dict, record_to_dict, utc_now

MODEL_FIELDS = {"_id": 0}


def _key(doc: dict) -> ApiKey:
    return ApiKey(**{**doc, "scopes": tuple(doc["scopes"]), "prefixes": tuple(doc["prefixes"])})


def _now() -> datetime:
    return datetime.now(UTC)


def _without_id(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "_id"}


def _from_doc(doc: dict) -> ModelRecord:
    return record_from_dict(_without_id(doc))


class MongoConnection:
    """One client and database shared by the Mongo stores; errors of reach become Unavailable."""

    def __init__(self, uri: str, database: str = "mds", timeout_ms: int = 3000):
        self.client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            uri, tz_aware=True, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms, socketTimeoutMS=30_000
        )
        # For messages: hosts only, never the credentials.
        self.where = ",".join(f"{host}:{port}" for host, port in uri_parser.parse_uri(uri)["nodelist"])
        self.db = self.client[database]
        self._indexes: list[tuple] = []
        self._indexes_lock = threading.Lock()

    def index(self, collection, keys: list, **options) -> None:
        """Declare an index; created on first use (the server may be down at start-up)."""
        self._indexes.append((collection, keys, options))

    @contextmanager
    def reachable(self):
        """Raise Unavailable, naming the backend, when MongoDB cannot be reached."""
        try:
            if self._indexes:
                with self._indexes_lock:
                    while self._indexes:
                        collection, keys, options = self._indexes[0]
                        collection.create_index(keys, **options)
                        self._indexes.pop(0)
            yield
        except ConnectionFailure as error:
            reason = str(error).split(",")[0][:200]
            raise Unavailable(f"MongoDB at {self.where} is unreachable ({reason}); retry when it is back") from None

    def ping(self) -> None:
        with self.reachable():
            self.client.admin.command("ping")


class MongoMetadataStore:
    def __init__(self, connection: MongoConnection):
        self.connection = connection
        self.models = connection.db["models"]
        self.names = connection.db["model_names"]
        connection.index(self.models, [("name", 1), ("version", 1)], unique=True, name="name_version")
        connection.index(self.models, [("files.sha256", 1)], name="files_sha256")
        self.guards = connection.db["blob_guards"]
        self.keys = connection.db["api_keys"]
        connection.index(self.keys, [("id", 1)], unique=True, name="api_keys_id")
        self.aliases = connection.db["aliases"]
        connection.index(self.aliases, [("model", 1), ("alias", 1)], unique=True, name="model_alias")
        self.alias_events = connection.db["alias_events"]
        connection.index(self.alias_events, [("model", 1), ("alias", 1), ("at", 1)], name="alias_events_alias")

    def create(self, record: ModelRecord) -> ModelRecord:
        """The unique (name, version) index is the guarantee: a collision takes the next number."""
        with self.connection.reachable():
            while True:
                try:
                    counter = self.names.find_one_and_update(
                        {"_id": record.name},
                        {"$inc": {"last_version": 1}},
                        upsert=True,
                        return_document=ReturnDocument.AFTER,
                    )
                    # upsert with ReturnDocument.AFTER always returns the document; pymongo types it as optional
                    stored = dataclasses.replace(record, version=counter["last_version"])  # type: ignore[index]
                    self.models.insert_one(record_to_dict(stored))
                    return stored
                except DuplicateKeyError:  # a concurrent upsert or allocation won this number
                    continue

    def get(self, name: str, version: int) -> ModelRecord | None:
        with self.connection.reachable():
            query = {"name": name, "version": version} if version else {"name": name}
            doc = self.models.find_one(query, MODEL_FIELDS, sort=[("version", -1)])
        return _from_doc(doc) if doc else None

    def list_page(self, name: str | None, after: tuple[str, int] | None, limit: int) -> list[ModelRecord]:
        query: dict = {"name": name} if name else {}
        if after:
            query = {
                "$and": [
                    query,
                    {"$or": [{"name": {"$gt": after[0]}}, {"name": after[0], "version": {"$gt": after[1]}}]},
                ]
            }
        with self.connection.reachable():
            cursor = self.models.find(query, MODEL_FIELDS).sort([("name", 1), ("version", 1)]).limit(limit)
            return [_from_doc(doc) for doc in cursor]

    def delete(self, name: str, version: int) -> list[ModelRecord]:
        query = {"name": name, "version": version} if version else {"name": name}
        with self.connection.reachable():
            records = [_from_doc(d) for d in self.models.find(query, MODEL_FIELDS).sort("version", 1)]
            self.models.delete_many({"name": name, "version": {"$in": [r.version for r in records]}})
        return records

    def blob_in_use(self, sha256: str) -> bool:
        with self.connection.reachable():
            return self.models.find_one({"files.sha256": sha256}, {"_id": 1}) is not None

    def _guard(self, sha256: str, condition: dict, update: dict) -> bool:
        """Apply `update` to the blob's guard (created if absent) when `condition` holds."""
        with self.connection.reachable():
            try:
                self.guards.update_one({"_id": sha256, **condition}, update, upsert=True)
                return True
            except DuplicateKeyError:  # the guard exists and the condition does not hold
                return False

    def claim_blob(self, sha256: str, deletions_stale_before: datetime) -> bool:
        no_deletion = {"$or": [{"deleting": None}, {"deleting_at": {"$lt": deletions_stale_before}}]}
        return self._guard(
            sha256,
            no_deletion,
            {"$inc": {"claims": 1}, "$max": {"claimed_at": _now()}, "$unset": {"deleting": "", "deleting_at": ""}},
        )

    def release_blob(self, sha256: str) -> None:
        with self.connection.reachable():
            self.guards.update_one({"_id": sha256}, {"$inc": {"claims": -1}})
            self.guards.delete_one({"_id": sha256, "claims": {"$lte": 0}, "deleting": None})

    def begin_blob_deletion(
        self, sha256: str, token: str, claims_stale_before: datetime, deletions_stale_before: datetime
    ) -> bool:
        free = {
            "$and": [
                {"$or": [{"claims": {"$not": {"$gt": 0}}}, {"claimed_at": {"$lt": claims_stale_before}}]},
                {"$or": [{"deleting": None}, {"deleting_at": {"$lt": deletions_stale_before}}]},
            ]
        }
        return self._guard(sha256, free, {"$set": {"deleting": token, "deleting_at": _now()}})

    def end_blob_deletion(self, sha256: str, token: str) -> None:
        with self.connection.reachable():
            self.guards.delete_one({"_id": sha256, "deleting": token})

    def _record_event(self, alias: AliasRecord, action: str, at: datetime, who: str) -> None:
        targets = (alias.version, alias.canary_version, alias.canary_percent)
        event = AliasEvent(alias.model, alias.alias, action, *targets, at=at, who=who)
        self.alias_events.insert_one(dataclasses.asdict(event))

    def set_alias(self, alias: AliasRecord, who: str) -> AliasRecord:
        now = utc_now()
        stored = dataclasses.replace(alias, updated_at=now)
        key = {"model": alias.model, "alias": alias.alias}
        with self.connection.reachable():
            while True:
                try:
                    self.aliases.update_one(key, {"$set": dataclasses.asdict(stored)}, upsert=True)
                    break
                except DuplicateKeyError:  # a concurrent upsert created it first: this one now moves it
                    continue
            self._record_event(stored, "set", now, who)
        return stored

    def get_alias(self, model: str, alias: str) -> AliasRecord | None:
        with self.connection.reachable():
            doc = self.aliases.find_one({"model": model, "alias": alias}, {"_id": 0})
        return AliasRecord(**doc) if doc else None

    def list_aliases(self, model: str) -> list[AliasRecord]:
        with self.connection.reachable():
            return [AliasRecord(**doc) for doc in self.aliases.find({"model": model}, {"_id": 0}).sort("alias", 1)]

    def delete_alias(self, model: str, alias: str, who: str) -> AliasRecord | None:
        with self.connection.reachable():
            # No projection: FerretDB does not implement one for findAndModify.
            doc = self.aliases.find_one_and_delete({"model": model, "alias": alias})
            deleted = AliasRecord(**_without_id(doc)) if doc else None
            if deleted:
                self._record_event(deleted, "delete", utc_now(), who)
        return deleted

    def alias_history(self, model: str, alias: str) -> list[AliasEvent]:
        with self.connection.reachable():
            cursor = self.alias_events.find({"model": model, "alias": alias}, {"_id": 0}).sort([("at", 1), ("_id", 1)])
            return [AliasEvent(**doc) for doc in cursor]

    def create_key(self, key: ApiKey) -> None:
        with self.connection.reachable():
            self.keys.insert_one(dataclasses.asdict(key))

    def get_key(self, key_id: str) -> ApiKey | None:
        with self.connection.reachable():
            doc = self.keys.find_one({"id": key_id}, {"_id": 0})
        return _key(doc) if doc else None

    def list_keys(self) -> list[ApiKey]:
        with self.connection.reachable():
            return [_key(doc) for doc in self.keys.find({}, {"_id": 0}).sort("id", 1)]

    def revoke_key(self, key_id: str) -> bool:
        with self.connection.reachable():
            return self.keys.update_one({"id": key_id}, {"$set": {"revoked": True}}).matched_count == 1

    def referenced_blobs(self) -> set[str]:
        with self.connection.reachable():
            return set(self.models.distinct("files.sha256"))

    def ping(self) -> None:
        self.connection.ping()
