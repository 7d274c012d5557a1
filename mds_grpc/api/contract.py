"""What the contract declares about each RPC: the scope its caller needs and the request field naming its model.

Both are options in protos/ (mds/v1/options.proto), read from the descriptors when the server starts.
"""

from collections.abc import Iterable
from typing import NamedTuple

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from mds.v1 import options_pb2
from mds_grpc.core.auth import ADMIN, PREDICT

PUBLIC = "public"  # probes: open unless MDS_AUTH_OPEN_PROBES=false, then any valid key
_SCOPES = {options_pb2.SCOPE_PUBLIC: PUBLIC, options_pb2.SCOPE_PREDICT: PREDICT, options_pb2.SCOPE_ADMIN: ADMIN}
# gRPC's own services, served beside ours, carry no options of ours: they are probes.
PROBE_SERVICES = tuple(
    module.DESCRIPTOR.services_by_name[name].full_name
    for module, name in ((health_pb2, "Health"), (reflection_pb2, "ServerReflection"))
)


class Rpc(NamedTuple):
    """What the contract declares about one method."""

    scope: str  # PUBLIC, or the API-key scope (core.auth) a caller needs
    # The request field naming the model; None when the request names none, and for a client
    # stream, whose servicer checks each message (auth.check_model).
    model_field: str | None


def model_field(message: Descriptor) -> str | None:
    """The field of `message` marked `(mds.v1.model_name)`, if any."""
    return next((f.name for f in message.fields if f.GetOptions().Extensions[options_pb2.model_name]), None)


def rpcs(services: Iterable[str]) -> dict[str, Rpc]:
    """{"/package.Service/Method": Rpc} for every method of the named services.

    Exits naming the first method that declares no scope: a server must not serve an RPC
    whose callers it cannot check.
    """
    pool = descriptor_pool.Default()
    table = {}
    for name in services:
        for method in pool.FindServiceByName(name).methods:
            path = f"/{name}/{method.name}"
            scope = PUBLIC if name in PROBE_SERVICES else _SCOPES.get(method.GetOptions().Extensions[options_pb2.scope])
            if scope is None:
                raise SystemExit(
                    f"error: {path} declares no scope: give it `option (mds.v1.scope)` in protos/ "
                    "(see mds/v1/options.proto)"
                )
            table[path] = Rpc(scope, None if method.client_streaming else model_field(method.input_type))
    return table
