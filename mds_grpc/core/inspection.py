"""Validating an uploaded model: safe external-data references, loadable by onnxruntime, its signature."""

import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

from mds_grpc.core.errors import InvalidArgument
from mds_grpc.core.records import TensorSpec
from mds_grpc.core.runtime import OnnxSession
from mds_grpc.core.uploads import check_relative_path, quoted

MAX_REASON_CHARS = 2000  # of onnxruntime's reason, which may quote any name in the model


@dataclass(frozen=True)
class ModelInfo:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opsets: tuple[tuple[str, int], ...]
    producer_name: str
    producer_version: str
    ir_version: int


def _check_external_data(graph: onnx.ModelProto, folder: Path, uploaded: set[str]) -> None:
    """Every external-data location names an uploaded side file that really lies inside `folder`."""
    inside = os.path.realpath(folder) + os.sep
    for tensor in _get_all_tensors(graph):
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        try:
            check_relative_path(location)
        except InvalidArgument:
            raise InvalidArgument(
                f"tensor {quoted(tensor.name)} keeps its data at {quoted(location)}, outside the model's folder; "
                "external data must be a relative path inside it"
            ) from None
        if location not in uploaded:
            raise InvalidArgument(
                f"tensor {quoted(tensor.name)} keeps its data in {quoted(location)}, which was not uploaded; "
                "send it as a side file (header.external_files)"
            )
        if not os.path.realpath(folder / location).startswith(inside):
            raise InvalidArgument(
                f"tensor {quoted(tensor.name)} keeps its data in {location!r}, which leads outside the model's "
                "folder through a symbolic link"
            )


def inspect_model(
    path: Path, side_files: set[str], intra_op_threads: int = 0, serve: bool = True
) -> tuple[OnnxSession, ModelInfo]:
    """Load the model at `path` to validate it; raise InvalidArgument naming the problem.

    With `serve`, the session can then serve; without, it is lean (see OnnxSession) and only checks.
    """
    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError, ValueError and more for garbage
        raise InvalidArgument(f"not an ONNX model: {error}") from None
    _check_external_data(graph, path.parent, side_files)
    try:
        session = OnnxSession(path, intra_op_threads, lean=not serve)
    except Exception as error:  # onnxruntime's own exception types carry the reason
        raise InvalidArgument(f"onnxruntime cannot load the model: {str(error)[:MAX_REASON_CHARS]}") from None
    info = ModelInfo(
        inputs=session.inputs,
        outputs=session.outputs,
        opsets=tuple((o.domain, o.version) for o in graph.opset_import),
        producer_name=graph.producer_name,
        producer_version=graph.producer_version,
        ir_version=graph.ir_version,
    )
    return session, info
