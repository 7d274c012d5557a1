"""A Triton/KServe client program: drives MDS's V2 endpoint with the `tritonclient` package.

Run in its own process (tritonclient registers the same protobuf message names as MDS),
it prints one JSON document: metadata, readiness, outputs as nested lists and the versions that ran.
Every call passes VERSION as model_version: "" for the latest, a number, or an alias name.

    python triton_client.py ADDRESS MODEL INPUTS.npz [--version VERSION] [--stream N]
"""

import argparse
import json
import queue
import sys

import numpy as np
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype


def inputs_of(arrays: dict) -> list:
    inputs = []
    for name, array in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def as_json(result) -> dict:
    """An infer result's outputs, and the version that ran."""
    response = result.get_response()
    outputs = {
        o.name: {"datatype": o.datatype, "shape": list(o.shape), "data": result.as_numpy(o.name).tolist()}
        for o in response.outputs
    }
    return {"outputs": outputs, "model_version": response.model_version}


def typed_infer(address: str, model: str, version: str, arrays: dict) -> dict:
    """ModelInfer with typed `contents`, through tritonclient's generated stubs: outputs and the version that ran."""
    import grpc

    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    for name, array in arrays.items():
        tensor = request.inputs.add(name=name, datatype=np_to_triton_dtype(array.dtype), shape=array.shape)
        field = {
            "FP32": "fp32_contents",
            "INT64": "int64_contents",
            "INT32": "int_contents",
            "BYTES": "bytes_contents",
        }[tensor.datatype]
        values = array.ravel().tolist()
        if tensor.datatype == "BYTES":
            values = [v.encode() for v in values]
        getattr(tensor.contents, field).extend(values)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
    response = stub.ModelInfer(request)
    outputs = {}
    for output in response.outputs:
        values = next(list(v) for _, v in output.contents.ListFields())
        outputs[output.name] = {
            "datatype": output.datatype,
            "shape": list(output.shape),
            "data": np.array(values).reshape(list(output.shape)).tolist(),
        }
    return {"outputs": outputs, "model_version": response.model_version}


def stream(client, model: str, version: str, arrays: dict, count: int, bad_index: int) -> list:
    """ModelStreamInfer: `count` requests on one stream, the one at `bad_index` naming a missing model."""
    replies: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    for i in range(count):
        name = model if i != bad_index else model + "-missing"
        client.async_stream_infer(name, inputs_of(arrays), model_version=version, request_id=str(i))
    out = []
    for _ in range(count):
        result, error = replies.get(timeout=60)
        if error is not None:
            out.append({"error": str(error)})
        else:
            out.append({"id": result.get_response().id, **as_json(result)})
    client.stop_stream()
    return out


def error_of(call) -> dict | None:
    """The status and message a call fails with; None when it succeeds."""
    try:
        call()
    except InferenceServerException as error:
        return {"status": error.status(), "message": error.message()}
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("model")
    parser.add_argument("inputs")
    parser.add_argument("--version", default="")
    parser.add_argument("--stream", type=int, default=0)
    args = parser.parse_args()
    arrays = dict(np.load(args.inputs, allow_pickle=True))
    arrays = {k: (v.astype(object) if v.dtype.kind == "U" else v) for k, v in arrays.items()}
    client = triton.InferenceServerClient(args.address)
    report = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "server": client.get_server_metadata(as_json=True),
        "model_ready": client.is_model_ready(args.model, args.version),
        "unknown_model_ready": client.is_model_ready(args.model + "-missing"),
        "unknown_alias_ready": client.is_model_ready(args.model, "no-such-alias"),
        "metadata": client.get_model_metadata(args.model, args.version, as_json=True),
        "raw": as_json(client.infer(args.model, inputs_of(arrays), model_version=args.version)),
        "typed": typed_infer(args.address, args.model, args.version, arrays),
        "missing_model_error": error_of(lambda: client.infer(args.model + "-missing", inputs_of(arrays))),
        "unknown_alias_error": error_of(
            lambda: client.infer(args.model, inputs_of(arrays), model_version="no-such-alias")
        ),
    }
    if args.stream:
        report["stream"] = stream(client, args.model, args.version, arrays, args.stream, bad_index=args.stream // 2)
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
