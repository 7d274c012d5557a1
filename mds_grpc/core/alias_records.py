"""What MDS knows about an alias: the version(s) a name like `prod` points at, and the history of its changes."""

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class AliasRecord:
    model: str
    alias: str
    version: int
    canary_version: int = 0  # 0: no canary
    canary_percent: int = 0  # of requests that go to canary_version, 0-100
    updated_at: datetime | None = None  # set by the metadata store when it records the alias

    @property
    def targets(self) -> tuple[int, ...]:
        """The versions it routes to: its version, and its canary when it has one."""
        return (self.version, self.canary_version) if self.canary_version else (self.version,)


@dataclass(frozen=True)
class AliasEvent:
    """One change of an alias: set (created or moved) or deleted, by whom (an API key id; "" when auth is off)."""

    model: str
    alias: str
    action: str  # "set" or "delete"
    version: int
    canary_version: int
    canary_percent: int
    at: datetime
    who: str
