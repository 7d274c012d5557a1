"""The `mds` command against a real server."""

import json
import subprocess
import sys

import numpy as np
import onnx_models


def mds(server, *args, check=True):
    result = subprocess.run([sys.executable, "-m", "mds_grpc", *args, "--server", server.address],
                            capture_output=True, text=True, timeout=120)
    assert not check or result.returncode == 0, result.stderr
    return result


def test_upload_predict_list_get_delete(server, unique, tmp_path):
    path = onnx_models.save_with_external_data(tmp_path)
    uploaded = json.loads(mds(server, "upload", str(path), "--name", unique, "--label", "team=ml",
                              "--description", "matmul", "--metadata", '{"owner": "me"}').stdout)
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
