"""Aliases through the front doors: the client library's calls and the `mds alias` commands, against a real server."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import onnx_models
from harness import ServerProcess, create_key, in_process, results, watch
from mds.v1 import job_service_pb2
from mds_grpc.client import Client, FailedPrecondition, InvalidArgument, NotFound
from mds_grpc.core.alias_records import AliasRecord
from mds_grpc.core.aliases import route

V1, V2 = onnx_models.dense(seed=1), onnx_models.dense(seed=2)  # same signature, different weights
X = np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)
TIMESTAMP = r"\d{4}-\d\d-\d\dT[0-9:.]+Z"


def mds(server: ServerProcess, *args: str, api_key: str = "", ok: bool = True) -> subprocess.CompletedProcess:
    """`mds ARGS` as a client of `server`; it must succeed unless `ok` is off."""
    command = [sys.executable, "-m", "mds_grpc", *args, "--server", server.address]
    ran = subprocess.run(command + (["--api-key", api_key] if api_key else []), capture_output=True, text=True)
    assert not ok or ran.returncode == 0, ran.stderr
    return ran


@pytest.fixture
def client(server):
    with Client(server.address) as client:
        yield client


def test_client_sets_routes_moves_and_deletes_an_alias(client, unique):
    for model in (V1, V2):
        client.upload(model, unique)
    alias = client.set_alias(unique, "prod", 1, canary_version=2, canary_percent=10)
    assert (alias.model, alias.alias, alias.version, alias.canary_version, alias.canary_percent) == (
        unique,
        "prod",
        1,
        2,
        10,
    )
    assert alias.updated_at.seconds > 0
    assert [a.alias for a in client.list_aliases(unique)] == ["prod"]
    main = client.get_model(unique, alias="prod")
    assert (main.version, list(main.aliases)) == (1, ["prod"])
    assert list(client.get_model(unique, 2).aliases) == ["prod"]  # the canary's version lists it too

    record = AliasRecord(unique, "prod", 1, 2, 10)
    for request_id in (f"request-{n}" for n in range(40)):
        ran = client.predict(unique, {"x": X}, alias="prod", request_id=request_id)
        assert ran.version == route(record, request_id), request_id  # the request id reached the server

    client.set_alias(unique, "prod", 2)  # promote
    assert {p.version for p in client.stream(unique, [{"x": X}] * 5, alias="prod")} == {2}
    deleted = client.delete_alias(unique, "prod")
    assert (deleted.alias, deleted.version, deleted.canary_version) == ("prod", 2, 0)
    assert client.list_aliases(unique) == []
    history = client.alias_history(unique, "prod")
    assert [(c.action, c.version, c.canary_version, c.canary_percent, c.who) for c in history] == [
        ("set", 1, 2, 10, ""),
        ("set", 2, 0, 0, ""),
        ("delete", 2, 0, 0, ""),
    ]
    assert [c.at.ToDatetime() for c in history] == sorted(c.at.ToDatetime() for c in history)


def test_client_errors_name_what_is_wrong(client, unique):
    client.upload(V1, unique)
    with pytest.raises(NotFound, match="'nope'"):
        client.predict(unique, {"x": X}, alias="nope")
    with pytest.raises(InvalidArgument, match="not both"):
        client.get_model(unique, 1, alias="prod")
    with pytest.raises(InvalidArgument, match="no version 9"):
        client.set_alias(unique, "prod", 9)
    with pytest.raises(InvalidArgument, match="not only digits"):
        client.set_alias(unique, "123", 1)
    client.set_alias(unique, "prod", 1)
    with pytest.raises(FailedPrecondition, match="'prod'"):
        client.delete_model(unique, 1)
    assert list(client.delete_model(unique, 1, remove_aliases=True).deleted_versions) == [1]
    assert client.alias_history(unique, "prod")[-1].action == "delete"


def test_alias_commands_roll_out_and_back(server, unique, tmp_path):
    with Client(server.address) as client:
        for model in (V1, V2):
            client.upload(model, unique)
    canary = json.loads(mds(server, "alias", "set", unique, "prod", "1", "--canary", "2", "--percent", "10").stdout)
    assert (canary["alias"], canary["version"], canary["canaryVersion"], canary["canaryPercent"]) == (
        "prod",
        "1",
        "2",
        10,
    )
    assert re.fullmatch(rf"prod\t1\tcanary 2 at 10%\t{TIMESTAMP}\n", mds(server, "alias", "list", unique).stdout)

    mds(server, "alias", "set", unique, "prod", "2")  # promote
    np.save(tmp_path / "x.npy", X)
    predicted = json.loads(mds(server, "predict", f"{unique}@prod", "--input", f"x={tmp_path / 'x.npy'}").stdout)
    assert predicted["version"] == 2
    np.testing.assert_allclose(predicted["outputs"]["scores"]["data"], in_process(V2, X, 4)["scores"], rtol=1e-6)
    got = json.loads(mds(server, "models", "get", f"{unique}@prod").stdout)
    assert (got["version"], got["aliases"]) == ("2", ["prod"])

    job = json.loads(mds(server, "jobs", "create", f"{unique}@prod", "--input", f"x={tmp_path / 'x.npy'}").stdout)
    mds(server, "alias", "set", unique, "prod", "1")  # roll back: the job keeps the version it was created on
    assert (job["version"], watch(server, job["id"])[-1].state) == ("2", job_service_pb2.JOB_STATE_SUCCEEDED)
    np.testing.assert_array_equal(results(server, job["id"])[1]["scores"], in_process(V2, X, 4)["scores"])

    history = mds(server, "alias", "history", unique, "prod").stdout.splitlines()
    assert [line.split("\t")[1:] for line in history] == [
        ["set", "1", "canary 2 at 10%", "-"],
        ["set", "2", "-", "-"],
        ["set", "1", "-", "-"],
    ]
    assert all(re.fullmatch(TIMESTAMP, line.split("\t")[0]) for line in history)

    mds(server, "alias", "set", unique, "staging", "2")
    assert json.loads(mds(server, "alias", "delete", unique, "staging").stdout)["alias"] == "staging"
    missing = mds(server, "predict", f"{unique}@staging", "--input", "x=[[0, 0, 0, 0, 0, 0, 0, 0]]", ok=False)
    assert (missing.returncode, missing.stderr) == (1, f"error: NOT_FOUND: model '{unique}' has no alias 'staging'\n")
    blocked = mds(server, "models", "delete", unique, ok=False)
    assert blocked.returncode == 1
    assert blocked.stderr.startswith(f"error: FAILED_PRECONDITION: alias 'prod' of model '{unique}'")
    assert blocked.stderr.count("\n") == 1
    deleted = json.loads(mds(server, "models", "delete", unique, "--remove-aliases").stdout)
    assert deleted["deletedVersions"] == ["1", "2"]


def test_history_names_the_key_that_made_each_change(tmp_path):
    server = ServerProcess(tmp_path, mds_auth="on").start()
    try:
        key_id, key = create_key(server, "--scope", "admin")
        with Client(server.address, api_key=key) as client:
            client.upload(V1, "fraud")
        mds(server, "alias", "set", "fraud", "prod", "1", api_key=key)
        denied = mds(server, "alias", "set", "fraud", "prod", "1", ok=False)
        assert denied.returncode == 1 and denied.stderr.startswith("error: UNAUTHENTICATED: ")
        [line] = mds(server, "alias", "history", "fraud", "prod", api_key=key).stdout.splitlines()
        assert re.fullmatch(rf"{TIMESTAMP}\tset\t1\t-\t{key_id}", line)
    finally:
        assert server.stop() == 0
