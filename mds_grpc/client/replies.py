"""Replies decoded to numpy: a prediction, and one batch of a job's results."""

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf import json_format

from mds.v1 import inference_service_pb2, job_service_pb2
from mds_grpc.api.tensors import to_array
from mds_grpc.core.limits import TensorLimits

# The server's limits are for what it accepts; what it sends back is decoded whatever its size.
NO_LIMITS = TensorLimits(
    max_inputs=sys.maxsize, max_rank=sys.maxsize, max_elements=sys.maxsize, max_string_bytes=sys.maxsize
)


def arrays_of(tensors) -> dict[str, np.ndarray]:
    return {tensor.name: to_array(tensor, NO_LIMITS) for tensor in tensors}


@dataclass(frozen=True)
class Prediction:
    """What a model returned: tensor outputs as arrays, in the model's order, and non-tensor outputs
    (e.g. scikit-learn's ZipMap, a list of dicts) as plain Python values."""

    model: str
    version: int  # the version that ran
    outputs: dict[str, np.ndarray]
    structured_outputs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, reply: inference_service_pb2.PredictResponse) -> "Prediction":
        structured = {name: json_format.MessageToDict(value) for name, value in reply.structured_outputs.items()}
        return cls(reply.model, reply.version, arrays_of(reply.outputs), structured)


@dataclass(frozen=True)
class ResultBatch:
    """Outputs for rows [row_offset, row_offset + rows) of a job; a batch may come in several parts,
    each with some of the outputs."""

    row_offset: int
    rows: int
    outputs: dict[str, np.ndarray]

    @classmethod
    def of(cls, batch: job_service_pb2.JobResultBatch) -> "ResultBatch":
        return cls(batch.row_offset, batch.rows, arrays_of(batch.outputs))
