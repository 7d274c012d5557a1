"""Which RPC needs which scope, and the guard every wrapped RPC runs first (see access_log.ServedServer)."""

import asyncio
import contextvars
import functools

from mds_grpc.core.auth import ADMIN, PREDICT, ApiKey, Authenticator, authorize
from mds_grpc.core.errors import PermissionDenied

# Probes, open like health and reflection unless MDS_AUTH_OPEN_PROBES is false.
PUBLIC = frozenset({"/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady",
                    "/inference.GRPCInferenceService/ServerMetadata"})
ADMIN_METHODS = frozenset({"/mds.v1.ModelService/UploadModel", "/mds.v1.ModelService/DeleteModel"})
_current_key: contextvars.ContextVar[ApiKey | None] = contextvars.ContextVar("api_key", default=None)


class Guard:
    """Authenticates the caller and checks the method's scope (and the request's model, when it names one)."""

    def __init__(self, authenticator: Authenticator, open_probes: bool = True):
        self.authenticator = authenticator
        self.open_probes = open_probes

    async def __call__(self, method: str, request, context) -> None:
        if self.open_probes and method in PUBLIC:
            return
        key_id, secret = self.authenticator.parse(dict(context.invocation_metadata() or ()).get("authorization"))
        known, key = self.authenticator.cached(key_id)
        if not known:  # only a key not seen lately costs a store read, off the event loop
            key = await asyncio.to_thread(self.authenticator.load, key_id)
        key = self.authenticator.verify(key, secret)
        _current_key.set(key)
        field = _model_field(type(request))
        authorize(key, ADMIN if method in ADMIN_METHODS else PREDICT, getattr(request, field) if field else "")


@functools.cache
def _model_field(request_type: type) -> str | None:
    """The string field naming a model in requests of this type (None for streams and model-less requests)."""
    fields = getattr(getattr(request_type, "DESCRIPTOR", None), "fields_by_name", {})
    return next((f for f in ("model", "name", "model_name")
                 if f in fields and fields[f].type == fields[f].TYPE_STRING), None)


def check_listing(name_filter: str, field: str) -> None:
    """A list RPC: a key limited to model-name prefixes must filter by one of its models."""
    key = _current_key.get()
    if key is not None and key.prefixes and not name_filter:
        raise PermissionDenied(f"API key {key.id} may only use models starting with {list(key.prefixes)}: "
                               f"set `{field}` to one of them")


def check_model(model: str, scope: str = PREDICT) -> None:
    """Inside a streaming RPC: may the caller use `model`? (A no-op when auth is off.)"""
    key = _current_key.get()
    if key is not None:
        authorize(key, scope, model)
