"""API keys: every RPC of every service x {no key, wrong key, revoked key, wrong scope, right scope}."""

import os
import subprocess
import sys

import grpc
import numpy as np
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import onnx_models
from harness import ServerProcess, assert_status, create_key, edited_contract, every_rpc, mds_keys, upload_requests
from mds.oip import grpc_service_pb2
from mds.v1 import inference_service_pb2, job_service_pb2, model_service_pb2
from mds_grpc.api import contract
from mds_grpc.api.tensors import from_array
from mds_grpc.core.auth import ADMIN

MODULES = (model_service_pb2, inference_service_pb2, job_service_pb2, grpc_service_pb2)
# What the contract declares: each method's scope and its request's model field.
RPCS = contract.rpcs(sorted({method.split("/")[0] for method in every_rpc()}))
PUBLIC = sorted(method.removeprefix("/") for method, rpc in RPCS.items() if rpc.scope == contract.PUBLIC)


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("auth"), mds_auth="on").start()
    keys = {
        "admin": create_key(server, "--scope", "admin")[1],
        "predict": create_key(server, "--scope", "predict", "--prefix", "pub-")[1],
    }
    revoked_id, keys["revoked"] = create_key(server, "--scope", "admin")
    assert mds_keys(server, "revoke", revoked_id).strip() == f"revoked {revoked_id}"
    keys["wrong"] = keys["admin"][:-4] + "AAAA"
    admin = (("authorization", f"Bearer {keys['admin']}"),)
    server.models.UploadModel(upload_requests("pub-model", onnx_models.add_two()), metadata=admin)
    yield server, keys
    assert server.stop() == 0


def request_for(method: str, model: str):
    """A request of the method's type that names `model` in its declared model field."""
    service, name = method.split("/")
    for module in MODULES:
        for descriptor in module.DESCRIPTOR.services_by_name.values():
            if descriptor.full_name == service:
                rpc = descriptor.methods_by_name[name]
                message_class = _message_class(rpc.input_type)
                message = message_class()
                if field := contract.model_field(message_class.DESCRIPTOR):
                    setattr(message, field, model)
                if name == "UploadModel":
                    message.header.name = model
                return rpc, message
    raise KeyError(method)


def _message_class(descriptor):
    return message_factory.GetMessageClass(descriptor)


def call(server, method: str, model: str, key: str | None) -> grpc.StatusCode:
    rpc, message = request_for(method, model)
    metadata = (("authorization", f"Bearer {key}"),) if key else None
    path = f"/{method}"
    serialize, parse = message.SerializeToString, _message_class(rpc.output_type).FromString
    kind = (rpc.client_streaming, rpc.server_streaming)
    try:
        if kind == (False, False):
            server.channel.unary_unary(path, serialize, parse)(message, metadata=metadata, timeout=30)
        elif kind == (True, False):
            server.channel.stream_unary(path, serialize, parse)(iter([message]), metadata=metadata, timeout=30)
        else:
            stub = (server.channel.unary_stream if not rpc.client_streaming else server.channel.stream_stream)(
                path, serialize, parse
            )
            replies = list(
                stub(message if not rpc.client_streaming else iter([message]), metadata=metadata, timeout=30)
            )
            errors = [getattr(r, "error", None) for r in replies]
            stream_error = next((e for e in errors if e is not None and e.code), None)
            if stream_error is not None:
                return grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == stream_error.code))
            v2_error = next((r.error_message for r in replies if getattr(r, "error_message", "")), "")
            if v2_error:
                return grpc.StatusCode[v2_error.split(":", 1)[0]]
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


DENIED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


@pytest.mark.parametrize("method", sorted(every_rpc()))
def test_every_rpc_checks_its_caller(secured, method):
    server, keys = secured
    scope = RPCS[f"/{method}"].scope
    if scope == contract.PUBLIC:
        assert call(server, method, "pub-model", None) == grpc.StatusCode.OK
        return
    for case in ("none", "wrong", "revoked"):
        assert call(server, method, "pub-model", keys.get(case)) == grpc.StatusCode.UNAUTHENTICATED, case
    if scope == ADMIN:  # a predict key has the wrong scope
        assert call(server, method, "pub-model", keys["predict"]) == grpc.StatusCode.PERMISSION_DENIED
        assert call(server, method, "pub-other", keys["admin"]) not in DENIED
    else:
        right = call(server, method, "pub-model", keys["predict"])
        assert right not in DENIED, right
        rpc, message = request_for(method, "x")
        if contract.model_field(message.DESCRIPTOR):
            # The predict key is limited to models named pub-*.
            assert call(server, method, "private-model", keys["predict"]) == grpc.StatusCode.PERMISSION_DENIED


def test_health_and_reflection_need_no_key(secured):
    server, _ = secured
    reply = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_keys_list_shows_no_secret(secured):
    server, keys = secured
    listed = mds_keys(server, "list")
    assert "revoked" in listed and "active" in listed and "pub-" in listed
    assert all(key.split("_", 2)[2] not in listed for key in keys.values())


def test_a_key_revoked_after_use_is_refused_once_its_read_is_due(tmp_path):
    """A header verified once passes unchecked only until its key is due to be re-read (here: at once)."""
    server = ServerProcess(tmp_path, mds_auth="on", mds_auth_cache_seconds="0").start()
    key_id, key = create_key(server, "--scope", "admin")
    metadata = (("authorization", f"Bearer {key}"),)
    try:
        server.models.ListModels(model_service_pb2.ListModelsRequest(), metadata=metadata, timeout=30)
        mds_keys(server, "revoke", key_id)
        assert_status(
            lambda: server.models.ListModels(model_service_pb2.ListModelsRequest(), metadata=metadata, timeout=30),
            grpc.StatusCode.UNAUTHENTICATED,
            "invalid or revoked API key",
        )
    finally:
        assert server.stop() == 0


def test_probes_can_require_a_key(tmp_path):
    server = ServerProcess(tmp_path, mds_auth="on", mds_auth_open_probes="false")
    _, key = create_key(server, "--scope", "predict")  # keys live in the data folder: made before the start
    server.probe_metadata = (("authorization", f"Bearer {key}"),)
    server.start()
    try:
        health = health_pb2_grpc.HealthStub(server.channel)
        assert_status(lambda: health.Check(health_pb2.HealthCheckRequest()), grpc.StatusCode.UNAUTHENTICATED)
        assert (
            health.Check(health_pb2.HealthCheckRequest(), metadata=server.probe_metadata).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        reflection = reflection_pb2_grpc.ServerReflectionStub(server.channel)
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        assert_status(lambda: list(reflection.ServerReflectionInfo(iter([listing]))), grpc.StatusCode.UNAUTHENTICATED)
        replies = list(reflection.ServerReflectionInfo(iter([listing]), metadata=server.probe_metadata))
        assert "mds.v1.InferenceService" in {s.name for s in replies[0].list_services_response.service}
        for method in PUBLIC:
            assert call(server, method, "", None) == grpc.StatusCode.UNAUTHENTICATED, method
            assert call(server, method, "", key) == grpc.StatusCode.OK, method
        access = [line for line in (server.log_dir / "mds.log").read_text().splitlines() if "mds.access" in line]
        assert not any("Health" in line or "Reflection" in line for line in access)
    finally:
        assert server.stop() == 0


def test_open_server_on_a_public_address_warns(tmp_path):
    server = ServerProcess(tmp_path, mds_auth="off", mds_grpc_host="0.0.0.0")
    server.address = f"127.0.0.1:{server.port}"
    server.start()
    try:
        log = (server.log_dir / "mds.log").read_text()
        assert "authentication is off on a non-loopback address" in log
    finally:
        assert server.stop() == 0


def test_job_ids_and_listings_keep_a_key_to_its_prefixes(secured):
    server, keys = secured
    admin = (("authorization", f"Bearer {keys['admin']}"),)
    limited = (("authorization", f"Bearer {keys['predict']}"),)
    server.models.UploadModel(upload_requests("private-jobs", onnx_models.dense()), metadata=admin)
    rows = from_array("x", np.zeros((2, 8), np.float32), raw=True)
    job = server.jobs.CreateJob(job_service_pb2.CreateJobRequest(model="private-jobs", inputs=[rows]), metadata=admin)
    by_id = job_service_pb2.GetJobRequest(id=job.id)
    for call_job in (
        lambda: server.jobs.GetJob(by_id, metadata=limited),
        lambda: server.jobs.CancelJob(job_service_pb2.CancelJobRequest(id=job.id), metadata=limited),
        lambda: list(server.jobs.WatchJob(job_service_pb2.WatchJobRequest(id=job.id), metadata=limited)),
        lambda: list(server.jobs.GetJobResults(job_service_pb2.GetJobResultsRequest(id=job.id), metadata=limited)),
    ):
        assert_status(call_job, grpc.StatusCode.PERMISSION_DENIED, "may not use model 'private-jobs'")
    assert server.jobs.GetJob(by_id, metadata=admin).model == "private-jobs"
    # Listing everything would show other models' names: a limited key must name one of its own.
    assert_status(
        lambda: server.jobs.ListJobs(job_service_pb2.ListJobsRequest(), metadata=limited),
        grpc.StatusCode.PERMISSION_DENIED,
        "set `model`",
    )
    assert_status(
        lambda: server.models.ListModels(model_service_pb2.ListModelsRequest(), metadata=limited),
        grpc.StatusCode.PERMISSION_DENIED,
        "set `name`",
    )
    assert server.jobs.ListJobs(job_service_pb2.ListJobsRequest(model="pub-model"), metadata=limited).jobs == []
    assert "private-jobs" in {
        m.name for m in server.models.ListModels(model_service_pb2.ListModelsRequest(), metadata=admin).models
    }


def test_a_method_without_a_scope_stops_the_start(tmp_path):
    """A new RPC in the contract that declares no scope: the server refuses to start rather than guess one."""
    gen = tmp_path / "gen"
    gen.mkdir()
    edited_contract(
        tmp_path,
        "service ModelService {\n",
        "service ModelService {\n  rpc RenameModel(GetModelRequest) returns (Model);\n",
        "--python_out={out}/gen",
        "--grpc_python_out={out}/gen",
    )
    for package in ("mds", "mds/v1", "mds/oip"):
        (gen / package / "__init__.py").touch()
    path = os.pathsep.join(filter(None, (str(gen), os.environ.get("PYTHONPATH"))))  # these stubs before gen/
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mds_grpc",
            "serve",
            "--grpc-port",
            "0",
            "--data-dir",
            str(tmp_path / "data"),
            "--log-dir",
            str(tmp_path / "logs"),
        ],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: /mds.v1.ModelService/RenameModel declares no scope: give it "
        "`option (mds.v1.scope)` in protos/ (see mds/v1/options.proto)"
    )
