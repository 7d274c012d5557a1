"""Big single-file models are checked in a helper process, one at a time, with the errors of an in-process check."""

import asyncio
import json
import multiprocessing
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import helper

import onnx_models
from harness import ServerProcess, assert_status, outputs_of, request, upload, wait_until
from mds_grpc.core.errors import InvalidArgument, MdsError, ResourceExhausted
from mds_grpc.core.inspection import inspect_model
from mds_grpc.core.validation import Validator

BIG = onnx_models.dense(features=1024, classes=1024)  # 4 MiB of weights inside the .onnx file


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """A server that checks every .onnx file over 1 MiB in a helper process, one at a time."""
    process = ServerProcess(
        tmp_path_factory.mktemp("validation"), mds_validation_in_process_max_bytes=1 << 20, mds_validation_processes=1
    ).start()
    yield process
    assert process.stop() == 0


def helper_lines(server: ServerProcess) -> list[dict]:
    lines = map(json.loads, (server.log_dir / "mds.log").read_text().splitlines())
    return [line for line in lines if line["message"] in ("helper process started", "helper process ended")]


def test_a_big_model_is_checked_in_a_helper_that_is_gone_after(strict, unique):
    before = len(helper_lines(strict))
    model = upload(strict, unique, BIG)
    started, ended = helper_lines(strict)[before:]
    assert started["message"] == "helper process started" and ended["message"] == "helper process ended"
    assert started["pid"] == ended["pid"] != strict.process.pid
    assert ended["exit_code"] == 0 and ended["peak_rss_mib"] > 0
    assert not Path(f"/proc/{ended['pid']}").exists()
    assert [(s.name, list(s.shape)) for s in model.inputs] == [("x", [-1, 1024])]
    x = np.ones((2, 1024), np.float32)
    assert outputs_of(strict.inference.Predict(request(unique, {"x": x})))["scores"].shape == (2, 1024)

    upload(strict, f"{unique}-small", onnx_models.add_two())
    assert len(helper_lines(strict)) == before + 2  # a small model is checked in the serving process


def without_folder(message: str) -> str:
    return re.sub(r"\S*/model\.onnx", "model.onnx", message)  # onnxruntime names the file it loaded


def test_a_big_model_fails_as_an_in_process_check_would(strict, unique, tmp_path):
    unknown_op = onnx.load_from_string(BIG)
    unknown_op.graph.node.append(helper.make_node("NoSuchOp", ["scores"], ["other"]))
    for data in (b"\x08" + os.urandom(2 << 20), unknown_op.SerializeToString()):
        path = tmp_path / "model.onnx"
        path.write_bytes(data)
        with pytest.raises(InvalidArgument) as in_process:
            inspect_model(path, set(), serve=False)
        details = assert_status(partial(upload, strict, unique, data), grpc.StatusCode.INVALID_ARGUMENT)
        assert without_folder(details) == without_folder(str(in_process.value))
    assert helper_lines(strict)[-1]["exit_code"] == 0
    assert strict.leftovers() == []


def test_concurrent_big_uploads_take_turns_in_the_one_helper(strict, unique):
    before = len(helper_lines(strict))
    with ThreadPoolExecutor(3) as pool:
        models = list(pool.map(lambda i: upload(strict, f"{unique}-{i}", BIG), range(3)))
    assert [m.version for m in models] == [1, 1, 1]
    events = [line["message"] for line in helper_lines(strict)[before:]]
    assert events == ["helper process started", "helper process ended"] * 3


def _killed() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer does


async def test_a_killed_helper_is_resource_exhausted_and_a_crashed_one_internal():
    validator = Validator()
    with pytest.raises(ResourceExhausted, match="out-of-memory killer.*MDS_VALIDATION_PROCESSES"):
        await validator.run(_killed)
    with pytest.raises(MdsError, match=r"died \(exit code 3\) before answering") as crashed:
        await validator.run(os._exit, 3)
    assert crashed.value.status == "INTERNAL"
    assert multiprocessing.active_children() == []


async def test_a_cancelled_check_kills_its_helper():
    check = asyncio.ensure_future(Validator().run(time.sleep, 3600))
    await asyncio.to_thread(wait_until, multiprocessing.active_children, what="the helper to start")
    (child,) = multiprocessing.active_children()
    check.cancel()
    with pytest.raises(asyncio.CancelledError):
        await check
    assert child.exitcode == -signal.SIGKILL and multiprocessing.active_children() == []
