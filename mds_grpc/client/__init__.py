"""A Python client for MDS: upload models, predict with numpy arrays, stream, and run bulk jobs.

    from mds_grpc.client import Client

    with Client("localhost:50051") as mds:
        mds.upload("model.onnx", "my-model")
        print(mds.predict("my-model", {"x": x}).outputs)

Failed calls raise an MdsError subclass named after the gRPC status (NotFound, InvalidArgument, ...);
`error.status` is the status code's name. Importing this package does not load onnxruntime or the server.
"""

from mds.v1.job_service_pb2 import JobState
from mds.v1.model_service_pb2 import Placement
from mds_grpc.client.client import Client
from mds_grpc.client.replies import Prediction, ResultBatch
from mds_grpc.core.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MdsError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)

__all__ = [
    "Placement",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "JobState",
    "MdsError",
    "NotFound",
    "PermissionDenied",
    "Prediction",
    "ResourceExhausted",
    "ResultBatch",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]
