"""Failed calls as MDS's typed exceptions (NotFound, InvalidArgument, ...), each with its gRPC status code name."""

import contextlib
from collections.abc import Iterator

import grpc
from google.rpc import status_pb2

from mds_grpc.core.errors import MdsError

BY_STATUS = {cls.status: cls for cls in MdsError.__subclasses__()}
STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def error_for(status: str, message: str) -> MdsError:
    """The exception for a status code name: its own class, or MdsError carrying `status` when none has it."""
    kind = BY_STATUS.get(status)
    if kind is not None:
        return kind(message)
    error = MdsError(message)
    error.status = status
    return error


def error_of(status: status_pb2.Status) -> MdsError:
    """The exception a google.rpc.Status (a failed request inside a stream) stands for."""
    return error_for(STATUS_NAMES.get(status.code, "UNKNOWN"), status.message)


@contextlib.contextmanager
def typed_errors() -> Iterator[None]:
    """Raise a failed call's grpc.RpcError as the matching MdsError (the RpcError is its __cause__)."""
    try:
        yield
    except grpc.RpcError as error:
        raise error_for(error.code().name, error.details() or "") from error
