"""What a served call leaves behind: one access line, and its metrics. Handlers add fields with `annotate`."""

import contextvars

from mds_grpc import metrics
from mds_grpc.logs import AccessLog

_fields: contextvars.ContextVar[dict] = contextvars.ContextVar("access_fields")


def annotate(**fields) -> None:
    """Add fields (model, version, ...) to the current RPC's access line."""
    current = _fields.get(None)
    if current is not None:
        current.update(fields)


def start(fields: dict) -> None:
    """Begin the current RPC's record with the fields taken from its request."""
    _fields.set(fields)


def finish(access: AccessLog, method: str, fields: dict, code: str, seconds: float) -> None:
    # Only served models label metrics: names from failed requests are unbounded.
    metrics.observe_rpc(method, str(fields.get("model", "")) if code == "OK" else "", code, seconds)
    access.write({"method": method, **fields, "code": code, "duration_ms": round(seconds * 1000, 3)})
