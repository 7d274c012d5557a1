"""API keys: random secrets shown once, stored hashed, with scopes and optional model-name prefixes."""

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime

from mds_grpc.core.errors import InvalidArgument, PermissionDenied, Unauthenticated
from mds_grpc.core.records import utc_now

ADMIN, PREDICT = "admin", "predict"
SCOPES = (ADMIN, PREDICT)  # admin: upload, delete, and everything predict may do; predict: inference and jobs


@dataclass(frozen=True)
class ApiKey:
    id: str
    secret_sha256: str
    scopes: tuple[str, ...]
    prefixes: tuple[str, ...] = ()  # model names the key may use; empty: every model
    description: str = ""
    created_at: datetime = field(default_factory=utc_now)
    revoked: bool = False


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key(scopes: list[str], prefixes: list[str], description: str = "") -> tuple[str, ApiKey]:
    """A new key and the token to give its holder (shown once: only its hash is kept)."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if not scopes or unknown:
        raise InvalidArgument(f"scopes must be among {list(SCOPES)}, got {scopes}")
    key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    return f"mds_{key_id}_{secret}", ApiKey(
        key_id, _digest(secret), tuple(sorted(set(scopes))), tuple(prefixes), description
    )


VERIFIED_MAX = 4096  # header values remembered as verified; past it, the memory starts over


class Authenticator:
    """Checks `authorization: Bearer <token>` against the key store; keys are re-read every `cache_seconds`.

    A header value verified once passes without parsing or hashing until its key is due to be re-read.
    """

    def __init__(self, get_key, cache_seconds: float = 5.0):
        self.get_key = get_key
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}
        self._verified: dict[str | None, tuple[float, ApiKey]] = {}  # header value -> (until, its key)

    def verified(self, authorization: str | None) -> ApiKey | None:
        """The key `authorization` was verified for, while that key's read is fresh; None: check it."""
        entry = self._verified.get(authorization)
        return entry[1] if entry is not None and entry[0] > time.monotonic() else None

    def remember(self, authorization: str | None, key_id: str, key: ApiKey) -> None:
        """`authorization` was verified for `key`: it passes until the key is due to be re-read."""
        if len(self._verified) >= VERIFIED_MAX:
            self._verified.clear()
        self._verified[authorization] = (self._cache[key_id][0], key)

    @staticmethod
    def parse(authorization: str | None) -> tuple[str, str]:
        """The key id and secret in the header value."""
        if not authorization:
            raise Unauthenticated("missing API key: send the metadata 'authorization: Bearer <key>'")
        scheme, _, token = authorization.partition(" ")
        parts = token.strip().split("_", 2)
        if scheme.lower() != "bearer" or len(parts) != 3 or parts[0] != "mds":
            raise Unauthenticated("malformed API key: send 'authorization: Bearer mds_<id>_<secret>'")
        return parts[1], parts[2]

    def cached(self, key_id: str) -> tuple[bool, ApiKey | None]:
        """(True, key or None) when the store was read for `key_id` within `cache_seconds`."""
        entry = self._cache.get(key_id)
        return (True, entry[1]) if entry is not None and entry[0] > time.monotonic() else (False, None)

    def load(self, key_id: str) -> ApiKey | None:
        """Read the key from the store (blocking) and remember it."""
        key = self.get_key(key_id)
        self._cache[key_id] = (time.monotonic() + self.cache_seconds, key)
        return key

    @staticmethod
    def verify(key: ApiKey | None, secret: str) -> ApiKey:
        if key is None or key.revoked or not hmac.compare_digest(_digest(secret), key.secret_sha256):
            raise Unauthenticated("invalid or revoked API key")
        return key


def authorize(key: ApiKey, scope: str, model: str = "") -> None:
    """PermissionDenied unless `key` may act with `scope` (on `model`, when one is named)."""
    if scope not in key.scopes and ADMIN not in key.scopes:
        raise PermissionDenied(f"API key {key.id} lacks the {scope!r} scope")
    if model and key.prefixes and not model.startswith(key.prefixes):
        raise PermissionDenied(f"API key {key.id} may not use model {model!r} (allowed prefixes: {list(key.prefixes)})")
