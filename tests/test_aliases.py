"""Aliases over gRPC against real servers: the contract's errors, canary routing, switching under load, and a
second server on the same MongoDB + MinIO following an alias."""

import threading
import time
import uuid

import grpc
import numpy as np
import pytest

import onnx_models
from harness import ServerProcess, assert_status, backend_env, deploy, request, wait_until
from mds.oip import grpc_service_pb2 as v2
from mds.oip import grpc_service_pb2_grpc as v2_grpc
from mds.v1 import job_service_pb2
from mds.v1 import model_service_pb2 as pb

X = {"x": np.ones((1, 8), np.float32)}


def two_versions(server, name: str) -> None:
    for seed in (1, 2):
        assert deploy(server, name, onnx_models.dense(seed=seed)) == seed


def set_alias(server, model: str, alias: str, version: int, canary: int = 0, percent: int = 0) -> pb.Alias:
    return server.models.SetAlias(
        pb.SetAliasRequest(model=model, alias=alias, version=version, canary_version=canary, canary_percent=percent),
        timeout=60,
    )


def test_aliases_select_versions_everywhere_a_model_is_named(server, unique):
    two_versions(server, unique)
    alias = set_alias(server, unique, "prod", 1)
    assert (alias.model, alias.alias, alias.version, alias.canary_version) == (unique, "prod", 1, 0)
    assert alias.updated_at.seconds > 0
    assert server.inference.Predict(request(unique, X, alias="prod")).version == 1
    assert server.models.GetModel(pb.GetModelRequest(name=unique, alias="prod")).version == 1
    assert list(server.models.GetModel(pb.GetModelRequest(name=unique, version=1)).aliases) == ["prod"]
    infer = v2.ModelInferRequest(
        model_name=unique,
        model_version="prod",
        inputs=[v2.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 8])],
        raw_input_contents=[X["x"].tobytes()],
    )
    assert v2_grpc.GRPCInferenceServiceStub(server.channel).ModelInfer(infer).model_version == "1"

    job = server.jobs.CreateJob(
        job_service_pb2.CreateJobRequest(model=unique, alias="prod", inputs=request(unique, X).inputs)
    )
    set_alias(server, unique, "prod", 2)  # moving the alias leaves the job on the version it was created with
    assert server.jobs.GetJob(job_service_pb2.GetJobRequest(id=job.id)).version == job.version == 1
    assert server.inference.Predict(request(unique, X, alias="prod")).version == 2

    set_alias(server, unique, "staging", 1)
    listed = server.models.ListAliases(pb.ListAliasesRequest(model=unique)).aliases
    assert [(a.alias, a.version) for a in listed] == [("prod", 2), ("staging", 1)]
    assert server.models.DeleteAlias(pb.DeleteAliasRequest(model=unique, alias="staging")).version == 1
    history = server.models.ListAliasHistory(pb.ListAliasHistoryRequest(model=unique, alias="staging")).changes
    assert [(c.action, c.version) for c in history] == [("set", 1), ("delete", 1)]


def test_alias_errors_name_what_is_wrong(server, unique):
    two_versions(server, unique)
    set_alias(server, unique, "prod", 1, canary=2, percent=10)
    for alias, fragment in (("Prod", "invalid alias"), ("123", "not only digits"), ("a/b", "invalid alias")):
        assert_status(lambda a=alias: set_alias(server, unique, a, 1), grpc.StatusCode.INVALID_ARGUMENT, fragment)
    assert_status(lambda: set_alias(server, unique, "x", 7), grpc.StatusCode.INVALID_ARGUMENT, "no version 7")
    assert_status(lambda: set_alias(server, unique, "x", 1, 9, 5), grpc.StatusCode.INVALID_ARGUMENT, "no version 9")
    assert_status(lambda: set_alias(server, unique, "x", 1, 2, 101), grpc.StatusCode.INVALID_ARGUMENT, "0 and 100")
    assert_status(lambda: set_alias(server, unique + "-none", "x", 1), grpc.StatusCode.NOT_FOUND, "does not exist")
    assert_status(
        lambda: server.inference.Predict(request(unique, X, alias="nope")), grpc.StatusCode.NOT_FOUND, "'nope'"
    )
    assert_status(
        lambda: server.inference.Predict(request(unique, X, alias="prod", version=1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "either version (1) or alias ('prod')",
    )
    assert_status(
        lambda: server.models.DeleteAlias(pb.DeleteAliasRequest(model=unique, alias="nope")),
        grpc.StatusCode.NOT_FOUND,
        "no alias 'nope'",
    )
    # A delete that would leave the alias routing to nothing is refused, unless it removes the alias too.
    for version in (2, 0):
        assert_status(
            lambda v=version: server.models.DeleteModel(pb.DeleteModelRequest(name=unique, version=v)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "alias 'prod'",
            "remove_aliases",
        )
    assert server.inference.Predict(request(unique, X, alias="prod")).version in (1, 2)
    deleted = server.models.DeleteModel(pb.DeleteModelRequest(name=unique, version=2, remove_aliases=True))
    assert list(deleted.deleted_versions) == [2]
    assert not server.models.ListAliases(pb.ListAliasesRequest(model=unique)).aliases
    history = server.models.ListAliasHistory(pb.ListAliasHistoryRequest(model=unique, alias="prod")).changes
    assert [(c.action, c.version, c.canary_version, c.canary_percent) for c in history] == [
        ("set", 1, 2, 10),
        ("delete", 1, 2, 10),
    ]


def test_a_canary_takes_its_share_and_a_request_id_always_lands_on_the_same_version(server, unique):
    two_versions(server, unique)
    set_alias(server, unique, "prod", 1, canary=2, percent=10)
    requests = [request(unique, X, alias="prod", request_id=f"r{i}") for i in range(4000)]
    replies = list(server.inference.PredictStream(iter(requests), timeout=300))
    assert not [r.error for r in replies if r.HasField("error")]
    share = sum(r.response.version == 2 for r in replies) / len(replies)
    assert 0.08 <= share <= 0.12
    again = list(server.inference.PredictStream(iter(requests[:500]), timeout=300))
    assert [r.response.version for r in again] == [r.response.version for r in replies[:500]]


def test_switching_an_alias_under_load_fails_no_request(server, unique):
    """Unary and stream clients predict through `prod` while it flips between two versions: no request fails,
    each runs on a version `prod` pointed at while it was in flight, and once SetAlias returns, every request
    that starts afterwards runs on the new target."""
    two_versions(server, unique)
    set_alias(server, unique, "prod", 1)
    switches = [(time.monotonic(), time.monotonic(), 1)]  # (SetAlias called, returned, version)
    seen: list[tuple[float, float, int]] = []  # (request sent, answered, version that ran)
    failures: list[Exception] = []
    stop = threading.Event()

    def unary():
        while not stop.is_set():
            sent = time.monotonic()
            try:
                version = server.inference.Predict(request(unique, X, alias="prod"), timeout=30).version
            except grpc.RpcError as error:
                failures.append(error)
                continue
            seen.append((sent, time.monotonic(), version))

    def streams():
        while not stop.is_set():
            sent = time.monotonic()
            try:
                for reply in server.inference.PredictStream(iter([request(unique, X, alias="prod")] * 20), timeout=30):
                    if reply.HasField("error"):
                        failures.append(RuntimeError(reply.error.message))
                    else:
                        seen.append((sent, time.monotonic(), reply.response.version))
            except grpc.RpcError as error:
                failures.append(error)

    clients = [threading.Thread(target=t) for t in (unary, unary, streams)]
    for client in clients:
        client.start()
    for flip in range(20):
        version = 2 - flip % 2
        called = time.monotonic()
        set_alias(server, unique, "prod", version)
        switches.append((called, time.monotonic(), version))
    stop.set()
    for client in clients:
        client.join()

    assert not failures
    assert len(seen) > 100
    for sent, answered, version in seen:
        # The targets `prod` had at some moment between sending and answering.
        live = {
            v
            for k, (_, _, v) in enumerate(switches)
            if switches[k][0] <= answered and (k + 1 == len(switches) or switches[k + 1][1] >= sent)
        }
        assert version in live
    for k in range(1, len(switches) - 1):  # requests sent after a switch returned and answered before the next
        _, returned, version = switches[k]
        within = [v for sent, answered, v in seen if returned <= sent and answered <= switches[k + 1][0]]
        assert set(within) <= {version}


@pytest.fixture
def shared_servers(services, tmp_path):
    """Two servers on the same MongoDB database and MinIO bucket."""
    env = {**backend_env(services, f"mds-alias-{uuid.uuid4().hex[:12]}"), "MDS_RESOLVE_TTL_SECONDS": "0.5"}
    env.pop("MDS_REDIS_URL")  # each runs jobs itself; no worker needed here
    first = ServerProcess(tmp_path / "a", **env).start()
    second = ServerProcess(tmp_path / "b", **env).start()
    yield first, second
    assert first.stop() == 0 and second.stop() == 0


def test_another_server_follows_an_alias_without_failing_a_request(shared_servers, unique):
    """Even when the version it left is deleted at once: the second server then asks the store again."""
    first, second = shared_servers
    two_versions(first, unique)
    set_alias(first, unique, "prod", 1)
    assert second.inference.Predict(request(unique, X, alias="prod"), timeout=60).version == 1
    set_alias(first, unique, "prod", 2)
    first.models.DeleteModel(pb.DeleteModelRequest(name=unique, version=1))  # allowed: no alias routes to it now
    versions: list[int] = []

    def follows() -> bool:  # every reply meanwhile is a success, from version 1 until the switch, then 2
        versions.append(second.inference.Predict(request(unique, X, alias="prod"), timeout=60).version)
        return versions[-1] == 2

    wait_until(follows, timeout=60, what="the second server to follow the alias")
    assert set(versions) <= {1, 2} and versions == sorted(versions)
    # It switched in the background, once version 2 was loaded, not on a request's path.
    assert f"alias prod of model {unique} now routes to versions (2,)" in (second.log_dir / "mds.log").read_text()
