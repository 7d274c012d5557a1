"""Errors the core raises; each front door maps `status` to its own wire status."""


class MdsError(Exception):
    """A failure a caller can act on. `status` names a gRPC status code."""

    status = "INTERNAL"


class InvalidArgument(MdsError):
    status = "INVALID_ARGUMENT"


class NotFound(MdsError):
    status = "NOT_FOUND"


class ResourceExhausted(MdsError):
    status = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(MdsError):
    status = "DEADLINE_EXCEEDED"


class Cancelled(MdsError):
    status = "CANCELLED"


class Unimplemented(MdsError):
    status = "UNIMPLEMENTED"


class Unavailable(MdsError):
    """A backend (database, object store, broker) cannot be reached; retrying later may work."""

    status = "UNAVAILABLE"


class FailedPrecondition(MdsError):
    status = "FAILED_PRECONDITION"


class Unauthenticated(MdsError):
    status = "UNAUTHENTICATED"


class PermissionDenied(MdsError):
    status = "PERMISSION_DENIED"
