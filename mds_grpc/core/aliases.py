"""Aliases: names like `prod` that point at a model version (and maybe a canary), moved without downtime.

An alias is read from the metadata store at most every `ttl` seconds per server. A server never routes to
a version it has not loaded: SetAlias loads and warms its targets before it records the change, and a
server that sees a change made elsewhere keeps serving the old targets until the new ones are loaded.
"""

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass

from mds_grpc import metrics
from mds_grpc.core.alias_records import AliasEvent, AliasRecord
from mds_grpc.core.errors import FailedPrecondition, InvalidArgument, NotFound, Unimplemented
from mds_grpc.core.records import ModelRecord
from mds_grpc.core.registry import ModelRegistry
from mds_grpc.core.runtime import RunFailed
from mds_grpc.core.stores import MetadataStore
from mds_grpc.core.uploads import NAME_PATTERN, quoted

log = logging.getLogger("mds.aliases")


def check_alias_name(alias: str) -> None:
    if not NAME_PATTERN.fullmatch(alias) or alias.isdigit():
        raise InvalidArgument(
            f"invalid alias {quoted(alias)}: use 1-128 characters of a-z, 0-9, '.', '_' and '-', starting with a "
            "letter or digit, and not only digits (those are version numbers)"
        )


def route(alias: AliasRecord, request_id: str = "") -> int:
    """The version one request through `alias` runs on: the canary for `canary_percent` of requests, picked by a
    hash of `request_id` (a retry lands on the same version), or at random without one."""
    if not alias.canary_version:
        return alias.version
    if request_id:
        digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
        bucket = int.from_bytes(digest, "little") % 100
    else:
        bucket = random.randrange(100)
    return alias.canary_version if bucket < alias.canary_percent else alias.version


@dataclass
class _Entry:
    alias: AliasRecord
    expiry: float  # time.monotonic()
    refresh: asyncio.Task | None = None


class Aliases:
    """Sets, lists, deletes and resolves aliases over the metadata store; targets are loaded through `registry`."""

    def __init__(self, metadata: MetadataStore, registry: ModelRegistry, ttl: float = 1.0):
        self.metadata = metadata
        self.registry = registry
        self.ttl = ttl
        self._entries: dict[tuple[str, str], _Entry] = {}

    async def set(
        self, model: str, alias: str, version: int, canary_version: int = 0, canary_percent: int = 0, who: str = ""
    ) -> AliasRecord:
        """Point `alias` at `version` (and a canary share), once the targets are loaded and warm on this server."""
        check_alias_name(alias)
        if not 0 <= canary_percent <= 100:
            raise InvalidArgument(f"canary_percent must be between 0 and 100, got {canary_percent}")
        if not (canary_version and canary_percent):  # either one 0 means no canary
            canary_version = canary_percent = 0
        draft = AliasRecord(model, alias, version, canary_version, canary_percent)
        await self.registry.get(model)  # NOT_FOUND for an unknown model
        for target in draft.targets:
            if target <= 0 or await asyncio.to_thread(self.metadata.get, model, target) is None:
                raise InvalidArgument(f"model {model!r} has no version {target} for alias {alias!r} to point at")
        await self._load(draft)
        stored = await asyncio.to_thread(self.metadata.set_alias, draft, who)
        self._entries[(model, alias)] = _Entry(stored, time.monotonic() + self.ttl)  # this server switches now
        return stored

    async def get(self, model: str, alias: str, reread: bool = False) -> AliasRecord:
        """The alias as this server routes it: read at most every `ttl` seconds, its targets loaded.

        Under traffic a change is followed in the background, the old targets serving meanwhile; after an
        idle spell longer than `ttl` (or with `reread`) the request waits for the store's answer instead."""
        entry = self._entries.get((model, alias))
        if entry is None:
            return await self._first_read(model, alias)
        now = time.monotonic()
        if (entry.expiry <= now or reread) and entry.refresh is None:
            entry.refresh = asyncio.ensure_future(self._refresh(entry))
        if entry.refresh is not None and (reread or entry.expiry + self.ttl <= now):
            await asyncio.shield(entry.refresh)
            current = self._entries.get((model, alias))
            return current.alias if current is not None else await self._first_read(model, alias)
        return entry.alias

    async def version_for(
        self, model: str, version: int, alias: str, request_id: str = "", canary: bool = True, reread: bool = False
    ) -> int:
        """The version a request selecting `version` or `alias` (exclusive) runs on. Prediction traffic
        (`canary`) takes the canary share and is counted by mds_alias_requests_total; other lookups get the
        alias's main version."""
        if not alias:
            return version
        if version:
            raise InvalidArgument(f"give either version ({version}) or alias ({alias!r}), not both")
        found = await self.get(model, alias, reread)
        if not canary:
            return found.version
        chosen = route(found, request_id)
        metrics.alias_request(model, alias, chosen)
        return chosen

    async def list_aliases(self, model: str) -> list[AliasRecord]:
        await self.registry.get(model)  # NOT_FOUND for an unknown model
        return await asyncio.to_thread(self.metadata.list_aliases, model)

    async def pointing_at(self, records: Iterable[ModelRecord]) -> dict[tuple[str, int], list[str]]:
        """{(model, version): the names of the aliases routing to it}, for the given versions."""
        found: dict[tuple[str, int], list[str]] = {}
        for model in dict.fromkeys(record.name for record in records):
            for alias in await asyncio.to_thread(self.metadata.list_aliases, model):
                for version in alias.targets:
                    found.setdefault((model, version), []).append(alias.alias)
        return found

    async def delete(self, model: str, alias: str, who: str = "") -> AliasRecord:
        deleted = await asyncio.to_thread(self.metadata.delete_alias, model, alias, who)
        self._entries.pop((model, alias), None)
        if deleted is None:
            raise NotFound(f"model {model!r} has no alias {alias!r}")
        return deleted

    async def delete_model(
        self, model: str, version: int = 0, remove_aliases: bool = False, who: str = ""
    ) -> list[int]:
        """Delete one version, or every version (0), of a model. An alias routing to one of them blocks the delete
        (FAILED_PRECONDITION), unless `remove_aliases`: then the alias is deleted first, by `who`."""
        if version > 0:
            await self.registry.get(model, version)  # NOT_FOUND before any alias is touched
        aliases = await asyncio.to_thread(self.metadata.list_aliases, model)
        for alias in [a for a in aliases if not version or version in a.targets]:
            if not remove_aliases:
                raise FailedPrecondition(
                    f"alias {alias.alias!r} of model {model!r} routes to version {version or alias.version}: "
                    "move or delete the alias first, or delete with remove_aliases"
                )
            with contextlib.suppress(NotFound):  # deleted meanwhile
                await self.delete(model, alias.alias, who)
        return await self.registry.delete(model, version)

    async def history(self, model: str, alias: str) -> list[AliasEvent]:
        events = await asyncio.to_thread(self.metadata.alias_history, model, alias)
        if not events:
            raise NotFound(f"model {model!r} has no alias {alias!r}, and never had")
        return events

    async def _first_read(self, model: str, alias: str) -> AliasRecord:
        found = await asyncio.to_thread(self.metadata.get_alias, model, alias)
        if found is None:
            raise NotFound(f"model {model!r} has no alias {quoted(alias)}")
        await self._load(found)  # the first request through it on this server loads it, as by version
        entry = self._entries.setdefault((model, alias), _Entry(found, time.monotonic() + self.ttl))
        return entry.alias

    async def _refresh(self, entry: _Entry) -> None:
        """Read the alias again; route to changed targets only once they are loaded here."""
        model, alias = entry.alias.model, entry.alias.alias
        try:
            found = await asyncio.to_thread(self.metadata.get_alias, model, alias)
            if found is None:
                if self._entries.get((model, alias)) is entry:
                    del self._entries[(model, alias)]
                return
            if found.targets != entry.alias.targets:
                await self._load(found)
                log.info("alias %s of model %s now routes to versions %s", alias, model, found.targets)
            entry.alias = found
        except Exception as error:  # a backend down, a target that cannot load: keep routing as before
            log.warning(
                "alias %s of model %s not refreshed, still routing to versions %s: %s",
                alias,
                model,
                entry.alias.targets,
                error,
            )
        finally:
            entry.expiry, entry.refresh = time.monotonic() + self.ttl, None

    async def _load(self, alias: AliasRecord) -> None:
        """Load every target of `alias` and give each a warm-up run."""
        for version in alias.targets:
            loaded = await self.registry.load(alias.model, version)
            try:
                await asyncio.to_thread(loaded.session.warm_up)
            except (RunFailed, Unimplemented) as error:  # zeros do not suit every model: it is loaded all the same
                log.info("warm-up run of model %s version %s failed: %s", alias.model, version, error)
