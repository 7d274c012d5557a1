"""The guard every wrapped RPC runs first (see rpc_wrapper.ServedServer), with the scopes the contract declares."""

import asyncio
import contextvars

from mds_grpc.api.contract import PUBLIC, Rpc
from mds_grpc.core.auth import PREDICT, ApiKey, Authenticator, authorize
from mds_grpc.core.errors import PermissionDenied

_current_key: contextvars.ContextVar[ApiKey | None] = contextvars.ContextVar("api_key", default=None)


class Guard:
    """Authenticates the caller and checks the method's scope (and the request's model, when it names one).

    `rpcs` is the contract's table of every served method (contract.rpcs); a public method
    needs no key with `open_probes`, any valid key without.
    """

    def __init__(self, authenticator: Authenticator, rpcs: dict[str, Rpc], open_probes: bool = True):
        self.authenticator = authenticator
        self.rpcs = rpcs
        self.open_probes = open_probes

    async def __call__(self, method: str, request, context) -> None:
        await self.check(method, dict(context.invocation_metadata() or ()).get("authorization"), request)

    async def check(self, method: str, authorization: str | None, request=None) -> None:
        """Raise unless the `authorization` value (`Bearer <key>`) may call `method` (with `request`)."""
        rpc = self.rpcs[method]
        if self.open_probes and rpc.scope == PUBLIC:
            return
        key = self.authenticator.verified(authorization)
        if key is None:
            key_id, secret = self.authenticator.parse(authorization)
            known, key = self.authenticator.cached(key_id)
            if not known:  # only a key not seen lately costs a store read, off the event loop
                key = await asyncio.to_thread(self.authenticator.load, key_id)
            key = self.authenticator.verify(key, secret)
            self.authenticator.remember(authorization, key_id, key)
        _current_key.set(key)
        if rpc.scope != PUBLIC:
            authorize(key, rpc.scope, getattr(request, rpc.model_field) if rpc.model_field else "")


def check_listing(name_filter: str, field: str) -> None:
    """A list RPC: a key limited to model-name prefixes must filter by one of its models."""
    key = _current_key.get()
    if key is not None and key.prefixes and not name_filter:
        raise PermissionDenied(
            f"API key {key.id} may only use models starting with {list(key.prefixes)}: set `{field}` to one of them"
        )


def caller() -> str:
    """The id of the API key the current RPC came with; "" when auth is off."""
    key = _current_key.get()
    return key.id if key is not None else ""


def check_model(model: str, scope: str = PREDICT) -> None:
    """Inside a streaming RPC: may the caller use `model`? (A no-op when auth is off.)"""
    key = _current_key.get()
    if key is not None:
        authorize(key, scope, model)
