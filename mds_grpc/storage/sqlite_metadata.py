"""Metadata store on SQLite (stdlib): the embedded default."""

import dataclasses
import json
import time
from datetime import datetime
from pathlib import Path

from mds_grpc.core.alias_records import AliasEvent, AliasRecord
from mds_grpc.core.auth import ApiKey
from mds_grpc.core.records import ModelRecord, record_from_dict, record_to_dict, utc_now
from mds_grpc.storage.sqlite_db import SqliteDatabase

SCHEMA = """
CREATE TABLE IF NOT EXISTS model_names (
    name TEXT PRIMARY KEY,
    last_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS model_blobs (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS model_blobs_sha256 ON model_blobs (sha256);
CREATE TABLE IF NOT EXISTS api_keys (id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blob_guards (
    sha256 TEXT PRIMARY KEY,
    claims INTEGER NOT NULL DEFAULT 0,
    claimed_at REAL,
    deleting TEXT,
    deleting_at REAL
);
CREATE TABLE IF NOT EXISTS aliases (
    model TEXT NOT NULL,
    alias TEXT NOT NULL,
    version INTEGER NOT NULL,
    canary_version INTEGER NOT NULL,
    canary_percent INTEGER NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (model, alias)
);
CREATE TABLE IF NOT EXISTS alias_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    alias TEXT NOT NULL,
    action TEXT NOT NULL,
    version INTEGER NOT NULL,
    canary_version INTEGER NOT NULL,
    canary_percent INTEGER NOT NULL,
    at TEXT NOT NULL,
    who TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alias_events_alias ON alias_events (model, alias, seq);
"""
ALIAS_COLUMNS = "model, alias, version, canary_version, canary_percent, updated_at"
EVENT_COLUMNS = "model, alias, action, version, canary_version, canary_percent, at, who"


def _encode(record: ModelRecord) -> str:
    data = record_to_dict(record)
    data["created_at"] = record.created_at.isoformat()
    return json.dumps(data)


def _decode(text: str) -> ModelRecord:
    data = json.loads(text)
    data["created_at"] = datetime.fromisoformat(data["created_at"])
    return record_from_dict(data)


def _encode_key(key: ApiKey) -> str:
    return json.dumps({**dataclasses.asdict(key), "created_at": key.created_at.isoformat()})


def _decode_key(text: str) -> ApiKey:
    data = json.loads(text)
    return ApiKey(
        **{
            **data,
            "scopes": tuple(data["scopes"]),
            "prefixes": tuple(data["prefixes"]),
            "created_at": datetime.fromisoformat(data["created_at"]),
        }
    )


def _targets(alias: AliasRecord) -> tuple[int, int, int]:
    return alias.version, alias.canary_version, alias.canary_percent


def _alias(row: tuple) -> AliasRecord:
    model, alias, version, canary_version, canary_percent, updated_at = row
    return AliasRecord(model, alias, version, canary_version, canary_percent, datetime.fromisoformat(updated_at))


def _event(row: tuple) -> AliasEvent:
    model, alias, action, version, canary_version, canary_percent, at, who = row
    return AliasEvent(model, alias, action, version, canary_version, canary_percent, datetime.fromisoformat(at), who)


class SqliteMetadataStore:
    def __init__(self, path: Path):
        self.db = SqliteDatabase(path, SCHEMA)

    def create(self, record: ModelRecord) -> ModelRecord:
        with self.db.transaction() as db:
            (version,) = db.execute(
                "INSERT INTO model_names (name, last_version) VALUES (?, 1) "
                "ON CONFLICT (name) DO UPDATE SET last_version = last_version + 1 "
                "RETURNING last_version",
                (record.name,),
            ).fetchone()
            stored = dataclasses.replace(record, version=version)
            db.execute(
                "INSERT INTO models (name, version, record) VALUES (?, ?, ?)",
                (stored.name, version, _encode(stored)),
            )
            db.executemany(
                "INSERT INTO model_blobs (name, version, sha256) VALUES (?, ?, ?)",
                [(stored.name, version, f.sha256) for f in stored.files],
            )
        return stored

    def get(self, name: str, version: int) -> ModelRecord | None:
        if version:
            rows = self.db.query("SELECT record FROM models WHERE name = ? AND version = ?", (name, version))
        else:
            rows = self.db.query("SELECT record FROM models WHERE name = ? ORDER BY version DESC LIMIT 1", (name,))
        return _decode(rows[0][0]) if rows else None

    def list_page(self, name: str | None, after: tuple[str, int] | None, limit: int) -> list[ModelRecord]:
        where: list[str] = []
        params: list[str | int] = []
        if name:
            where.append("name = ?")
            params.append(name)
        if after:
            where.append("(name, version) > (?, ?)")
            params.extend(after)
        sql = "SELECT record FROM models"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY name, version LIMIT ?"
        return [_decode(text) for (text,) in self.db.query(sql, (*params, limit))]

    def delete(self, name: str, version: int) -> list[ModelRecord]:
        match, params = ("name = ? AND version = ?", (name, version)) if version else ("name = ?", (name,))
        with self.db.transaction() as db:
            rows = db.execute(f"SELECT record FROM models WHERE {match} ORDER BY version", params).fetchall()
            db.execute(f"DELETE FROM models WHERE {match}", params)
            db.execute(f"DELETE FROM model_blobs WHERE {match}", params)
        return [_decode(text) for (text,) in rows]

    def blob_in_use(self, sha256: str) -> bool:
        return bool(self.db.query("SELECT 1 FROM model_blobs WHERE sha256 = ? LIMIT 1", (sha256,)))

    @staticmethod
    def _guard(db, sha256: str) -> tuple:
        """(claims, claimed_at, deleting, deleting_at) of the blob, zeros when it has no guard row."""
        rows = db.execute(
            "SELECT claims, claimed_at, deleting, deleting_at FROM blob_guards WHERE sha256 = ?", (sha256,)
        ).fetchall()
        return rows[0] if rows else (0, 0.0, None, 0.0)

    def claim_blob(self, sha256: str, deletions_stale_before: datetime) -> bool:
        with self.db.transaction() as db:
            _, _, deleting, deleting_at = self._guard(db, sha256)
            if deleting is not None and deleting_at >= deletions_stale_before.timestamp():
                return False
            db.execute(
                "INSERT INTO blob_guards (sha256, claims, claimed_at) VALUES (?, 1, ?) "
                "ON CONFLICT (sha256) DO UPDATE SET claims = claims + 1, claimed_at = excluded.claimed_at, "
                "deleting = NULL, deleting_at = NULL",
                (sha256, time.time()),
            )
        return True

    def release_blob(self, sha256: str) -> None:
        with self.db.transaction() as db:
            db.execute("UPDATE blob_guards SET claims = claims - 1 WHERE sha256 = ?", (sha256,))
            db.execute("DELETE FROM blob_guards WHERE sha256 = ? AND claims <= 0 AND deleting IS NULL", (sha256,))

    def begin_blob_deletion(
        self, sha256: str, token: str, claims_stale_before: datetime, deletions_stale_before: datetime
    ) -> bool:
        with self.db.transaction() as db:
            claims, claimed_at, deleting, deleting_at = self._guard(db, sha256)
            if (claims > 0 and claimed_at >= claims_stale_before.timestamp()) or (
                deleting is not None and deleting_at >= deletions_stale_before.timestamp()
            ):
                return False
            db.execute(
                "INSERT INTO blob_guards (sha256, deleting, deleting_at) VALUES (?, ?, ?) "
                "ON CONFLICT (sha256) DO UPDATE SET deleting = excluded.deleting, "
                "deleting_at = excluded.deleting_at",
                (sha256, token, time.time()),
            )
        return True

    def end_blob_deletion(self, sha256: str, token: str) -> None:
        with self.db.transaction() as db:
            db.execute("DELETE FROM blob_guards WHERE sha256 = ? AND deleting = ?", (sha256, token))

    @staticmethod
    def _record_event(db, alias: AliasRecord, action: str, at: datetime, who: str) -> None:
        db.execute(
            f"INSERT INTO alias_events ({EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (alias.model, alias.alias, action, *_targets(alias), at.isoformat(), who),
        )

    def set_alias(self, alias: AliasRecord, who: str) -> AliasRecord:
        now = utc_now()
        with self.db.transaction() as db:
            db.execute(
                f"INSERT OR REPLACE INTO aliases ({ALIAS_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                (alias.model, alias.alias, *_targets(alias), now.isoformat()),
            )
            self._record_event(db, alias, "set", now, who)
        return dataclasses.replace(alias, updated_at=now)

    def get_alias(self, model: str, alias: str) -> AliasRecord | None:
        rows = self.db.query(f"SELECT {ALIAS_COLUMNS} FROM aliases WHERE model = ? AND alias = ?", (model, alias))
        return _alias(rows[0]) if rows else None

    def list_aliases(self, model: str) -> list[AliasRecord]:
        rows = self.db.query(f"SELECT {ALIAS_COLUMNS} FROM aliases WHERE model = ? ORDER BY alias", (model,))
        return [_alias(row) for row in rows]

    def delete_alias(self, model: str, alias: str, who: str) -> AliasRecord | None:
        with self.db.transaction() as db:
            rows = db.execute(
                f"DELETE FROM aliases WHERE model = ? AND alias = ? RETURNING {ALIAS_COLUMNS}", (model, alias)
            ).fetchall()
            deleted = _alias(rows[0]) if rows else None
            if deleted:
                self._record_event(db, deleted, "delete", utc_now(), who)
        return deleted

    def alias_history(self, model: str, alias: str) -> list[AliasEvent]:
        rows = self.db.query(
            f"SELECT {EVENT_COLUMNS} FROM alias_events WHERE model = ? AND alias = ? ORDER BY seq", (model, alias)
        )
        return [_event(row) for row in rows]

    def create_key(self, key: ApiKey) -> None:
        with self.db.transaction() as db:
            db.execute("INSERT INTO api_keys (id, record) VALUES (?, ?)", (key.id, _encode_key(key)))

    def get_key(self, key_id: str) -> ApiKey | None:
        rows = self.db.query("SELECT record FROM api_keys WHERE id = ?", (key_id,))
        return _decode_key(rows[0][0]) if rows else None

    def list_keys(self) -> list[ApiKey]:
        return [_decode_key(text) for (text,) in self.db.query("SELECT record FROM api_keys ORDER BY id")]

    def revoke_key(self, key_id: str) -> bool:
        with self.db.transaction() as db:
            rows = db.execute("SELECT record FROM api_keys WHERE id = ?", (key_id,)).fetchall()
            if rows:
                revoked = dataclasses.replace(_decode_key(rows[0][0]), revoked=True)
                db.execute("UPDATE api_keys SET record = ? WHERE id = ?", (_encode_key(revoked), key_id))
        return bool(rows)

    def referenced_blobs(self) -> set[str]:
        return {sha for (sha,) in self.db.query("SELECT DISTINCT sha256 FROM model_blobs")}

    def ping(self) -> None:
        self.db.query("SELECT 1")
