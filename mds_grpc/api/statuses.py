"""The one place where an error raised while serving becomes a gRPC status and message."""

import logging
import uuid

import grpc

from mds_grpc.core.errors import MdsError

errors_log = logging.getLogger("mds.errors")

# A status message travels in metadata, which gRPC caps at 16 KiB in all and where each
# non-ASCII byte is percent-encoded (3 characters; up to 12 for one character).
MAX_MESSAGE_CHARS = 2000
MAX_NON_ASCII_MESSAGE_CHARS = 500


def status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message for an error raised while serving a request."""
    if isinstance(error, MdsError):
        message = str(error)
        limit = MAX_MESSAGE_CHARS if message.isascii() else MAX_NON_ASCII_MESSAGE_CHARS
        if len(message) > limit:
            message = message[:limit] + f"... ({len(message)} characters in all)"
        return grpc.StatusCode[error.status], message
    incident = uuid.uuid4().hex[:12]
    errors_log.error("internal error %s", incident, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error {incident}; the server log has details"
