"""grpcurl, with nothing but server reflection, calls every RPC of every MDS service."""

import base64

import numpy as np

import onnx_models
from harness import every_rpc, grpcurl_call
from mds.v1 import job_service_pb2
from mds_grpc.api.tensors import from_array

FP32 = "DATA_TYPE_FP32"


def test_grpcurl_calls_every_rpc(server, unique):
    called = set()

    def call(method: str, *messages: dict) -> list[dict]:
        called.add(method)
        return grpcurl_call(server.address, method, *messages)

    model = base64.b64encode(onnx_models.add_two(2.0)).decode()

    def tensor(name: str, values: list) -> dict:
        return {"name": name, "dtype": FP32, "shape": [len(values)], "contents": {"fp32_contents": values}}

    inputs = [tensor("a", [1, 2]), tensor("b", [10, 20])]

    (uploaded,) = call(
        "mds.v1.ModelService/UploadModel", {"header": {"name": unique}}, {"chunk": model[:80]}, {"chunk": model[80:]}
    )
    assert uploaded["version"] == "1"
    assert call("mds.v1.ModelService/GetModel", {"name": unique})[0]["name"] == unique
    assert [m["name"] for m in call("mds.v1.ModelService/ListModels", {"name": unique})[0]["models"]] == [unique]
    (predicted,) = call("mds.v1.InferenceService/Predict", {"model": unique, "inputs": inputs})
    assert predicted["outputs"][0]["contents"]["fp32_contents"] == [22, 44]
    streamed = call(
        "mds.v1.InferenceService/PredictStream",
        {"model": unique, "inputs": inputs, "request_id": "1"},
        {"model": unique, "request_id": "2"},
    )
    assert [r["request_id"] for r in streamed] == ["1", "2"] and "error" in streamed[1]

    header = {"inputs": [{"name": "a", "dtype": FP32, "shape": [4]}, {"name": "b", "dtype": FP32, "shape": [4]}]}
    chunk = {"inputs": [tensor("a", [1, 2]), tensor("b", [1, 2])]}
    (job_input,) = call("mds.v1.JobService/UploadJobInput", {"header": header}, {"chunk": chunk}, {"chunk": chunk})
    (job,) = call("mds.v1.JobService/CreateJob", {"model": unique, "input_id": job_input["id"], "batch_rows": 2})
    assert call("mds.v1.JobService/WatchJob", {"id": job["id"]})[-1]["state"] == "JOB_STATE_SUCCEEDED"
    assert call("mds.v1.JobService/GetJob", {"id": job["id"]})[0]["rows_done"] == "4"
    assert job["id"] in [j["id"] for j in call("mds.v1.JobService/ListJobs", {"model": unique})[0]["jobs"]]
    results = call("mds.v1.JobService/GetJobResults", {"id": job["id"]})  # the 2 batches, recorded together or not
    assert sum(int(r["rows"]) for r in results) == 4
    rows = np.ones(200_000, np.float32)
    long_job = server.jobs.CreateJob(
        job_service_pb2.CreateJobRequest(
            model=unique, batch_rows=10, inputs=[from_array("a", rows, raw=True), from_array("b", rows, raw=True)]
        )
    )
    assert call("mds.v1.JobService/CancelJob", {"id": long_job.id})[0]["state"] == "JOB_STATE_CANCELLED"

    v2_input = [{"name": n, "datatype": "FP32", "shape": [1], "contents": {"fp32_contents": [1]}} for n in "ab"]
    assert call("inference.GRPCInferenceService/ServerLive", {})[0]["live"] is True
    assert call("inference.GRPCInferenceService/ServerReady", {})[0]["ready"] is True
    assert call("inference.GRPCInferenceService/ModelReady", {"name": unique})[0]["ready"] is True
    assert call("inference.GRPCInferenceService/ServerMetadata", {})[0]["name"] == "mds"
    assert call("inference.GRPCInferenceService/ModelMetadata", {"name": unique})[0]["versions"] == ["1"]
    (inferred,) = call("inference.GRPCInferenceService/ModelInfer", {"model_name": unique, "inputs": v2_input})
    assert inferred["outputs"][0]["contents"]["fp32_contents"] == [4]
    (stream_reply,) = call(
        "inference.GRPCInferenceService/ModelStreamInfer", {"model_name": unique, "inputs": v2_input}
    )
    assert stream_reply["infer_response"]["outputs"][0]["contents"]["fp32_contents"] == [4]

    alias = {"model": unique, "alias": "prod"}
    assert call("mds.v1.ModelService/SetAlias", {**alias, "version": 1})[0]["version"] == "1"
    assert [a["alias"] for a in call("mds.v1.ModelService/ListAliases", {"model": unique})[0]["aliases"]] == ["prod"]
    (through_alias,) = call("mds.v1.InferenceService/Predict", {**alias, "model": unique, "inputs": inputs})
    assert through_alias["version"] == "1"
    assert call("mds.v1.ModelService/DeleteAlias", alias)[0]["alias"] == "prod"
    changes = call("mds.v1.ModelService/ListAliasHistory", alias)[0]["changes"]
    assert [c["action"] for c in changes] == ["set", "delete"]

    assert call("mds.v1.ModelService/DeleteModel", {"name": unique})[0]["deleted_versions"] == ["1"]
    assert called == every_rpc()
