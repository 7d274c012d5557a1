"""The `mds` command against a real server."""

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort

import onnx_models


def mds(server, *args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "mds_grpc", *args, "--server", server.address],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert not check or result.returncode == 0, result.stderr
    return result


def test_upload_predict_list_get_delete(server, unique, tmp_path):
    path = onnx_models.save_with_external_data(tmp_path)
    uploaded = json.loads(
        mds(
            server,
            "upload",
            str(path),
            "--name",
            unique,
            "--label",
            "team=ml",
            "--description",
            "matmul",
            "--metadata",
            '{"owner": "me"}',
        ).stdout
    )
    assert uploaded["version"] == "1" and uploaded["labels"] == {"team": "ml"}
    assert [f["path"] for f in uploaded["files"]] == ["model.onnx", "model.onnx.data"]

    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    reply = json.loads(mds(server, "predict", unique, "--input", f"x={tmp_path / 'x.npy'}").stdout)
    assert reply["outputs"]["y"]["shape"] == [2, 32] and reply["outputs"]["y"]["dtype"] == "FP32"
    inline = json.loads(mds(server, "predict", unique, "--input", f"x={json.dumps(x.tolist())}").stdout)
    assert inline["outputs"] == reply["outputs"]

    assert f"{unique}\t1\t" in mds(server, "models", "list").stdout
    assert json.loads(mds(server, "models", "get", unique).stdout)["description"] == "matmul"
    assert json.loads(mds(server, "models", "delete", unique).stdout)["deletedVersions"] == ["1"]


def test_errors_print_one_line_and_exit_non_zero(server, unique):
    missing = mds(server, "models", "get", unique, check=False)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"error: NOT_FOUND: model '{unique}' does not exist"
    bad_input = mds(server, "predict", unique, "--input", "novalue", check=False)
    assert bad_input.returncode == 1 and bad_input.stderr.count("\n") == 1
    no_file = mds(server, "upload", "/nonexistent.onnx", "--name", unique, check=False)
    assert no_file.returncode == 1 and no_file.stderr.startswith("error: ") and no_file.stderr.count("\n") == 1


def test_million_row_job_through_the_cli(server, unique, tmp_path):
    model = onnx_models.dense()
    (tmp_path / "dense.onnx").write_bytes(model)
    mds(server, "upload", str(tmp_path / "dense.onnx"), "--name", unique, "--quiet")
    x = np.random.default_rng(9).standard_normal((1_000_000, 8)).astype(np.float32)
    np.save(tmp_path / "rows.npy", x)
    created = json.loads(
        mds(server, "jobs", "create", unique, "--input", f"x={tmp_path / 'rows.npy'}", "--batch-rows", "65536").stdout
    )
    assert created["state"] == "JOB_STATE_QUEUED" and created["rowsTotal"] == "1000000"
    watched = mds(server, "jobs", "watch", created["id"])
    assert watched.stdout.strip() == f"job {created['id']} SUCCEEDED: 1000000 rows"
    assert "rows/s" in watched.stderr  # the live progress bar
    mds(server, "jobs", "results", created["id"], "--out", str(tmp_path / "out"))
    session = ort.InferenceSession(model)
    for offset in range(0, len(x), 65536):
        want_scores, want_label = session.run(None, {"x": x[offset : offset + 65536]})
        got_scores = np.load(tmp_path / "out" / "scores.npy", mmap_mode="r")[offset : offset + 65536]
        np.testing.assert_array_equal(got_scores, want_scores)
        np.testing.assert_array_equal(
            np.load(tmp_path / "out" / "label.npy", mmap_mode="r")[offset : offset + 65536], want_label
        )
    listed = mds(server, "jobs", "list", unique).stdout
    assert f"{created['id']}\t{unique}\t1\tSUCCEEDED\t1000000/1000000" in listed
