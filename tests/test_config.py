"""Settings: renamed ones, which still take effect with one deprecation warning each, and checked values."""

import os
import subprocess
import sys

import pytest

from harness import DENSE, ServerProcess, upload_requests
from mds_grpc.config import load_settings

RENAMED_VARIABLES = ("MDS_PROCESSES", "MDS_WORKERS", "MDS_JOB_THREADS", "MDS_JOB_WORKERS")
NEEDS_A_PORT = "error: MDS_PROCESSES > 1 needs a fixed MDS_GRPC_PORT: processes cannot share port 0"


@pytest.fixture
def environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # away from any .env
    for name in RENAMED_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def deprecations(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]


def test_new_names_take_effect_without_warnings(environment, caplog):
    environment.setenv("MDS_PROCESSES", "3")
    environment.setenv("MDS_JOB_THREADS", "4")
    settings = load_settings()
    assert (settings.processes, settings.job_threads) == (3, 4)
    assert deprecations(caplog) == []


def test_old_names_still_take_effect_and_warn_once_each(environment, caplog):
    environment.setenv("MDS_WORKERS", "3")
    environment.setenv("MDS_JOB_WORKERS", "4")
    settings = load_settings()
    assert (settings.processes, settings.job_threads) == (3, 4)
    assert deprecations(caplog) == [
        "MDS_WORKERS is deprecated, use MDS_PROCESSES",
        "MDS_JOB_WORKERS is deprecated, use MDS_JOB_THREADS",
    ]


def test_the_new_name_wins_over_the_old_one(environment, caplog, tmp_path):
    (tmp_path / ".env").write_text("MDS_JOB_THREADS=2\n")
    environment.setenv("MDS_JOB_WORKERS", "5")
    assert load_settings().job_threads == 2
    assert deprecations(caplog) == [
        "MDS_JOB_WORKERS is deprecated, use MDS_JOB_THREADS; ignored because MDS_JOB_THREADS is set"
    ]


def test_a_bad_old_value_names_the_variable_it_came_from(environment):
    environment.setenv("MDS_JOB_WORKERS", "many")
    with pytest.raises(SystemExit, match="MDS_JOB_WORKERS='many' is not a valid int"):
        load_settings()


def test_the_stream_window_is_a_size_or_0_for_grpcs_own(environment):
    environment.setenv("MDS_GRPC_STREAM_WINDOW_BYTES", "0")
    assert load_settings().grpc_stream_window_bytes == 0
    environment.setenv("MDS_GRPC_STREAM_WINDOW_BYTES", "-1")
    with pytest.raises(SystemExit, match="MDS_GRPC_STREAM_WINDOW_BYTES must be 0 or more, got -1"):
        load_settings()


def test_a_server_on_grpcs_own_stream_window_takes_uploads(tmp_path):
    """MDS_GRPC_STREAM_WINDOW_BYTES=0: no fixed window; an upload of many chunks streams as with one."""
    server = ServerProcess(tmp_path, mds_grpc_stream_window_bytes=0).start()
    try:
        side = {"model.onnx.data": bytes(8 << 20)}  # past the default window, in 64 KiB chunks
        model = server.models.UploadModel(upload_requests("window", DENSE, side_files=side))
        assert model.version == 1 and [f.size_bytes for f in model.files][-1] == 8 << 20
    finally:
        assert server.stop() == 0


def serve(tmp_path, *flags: str) -> list[str]:
    """stderr lines of `mds serve FLAGS` on port 0, which stops at once when it would start several processes."""
    env = {k: v for k, v in os.environ.items() if k not in RENAMED_VARIABLES}
    result = subprocess.run(
        [sys.executable, "-m", "mds_grpc", "serve", "--grpc-port", "0", "--log-dir", str(tmp_path / "logs"), *flags],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    return result.stderr.splitlines()


def test_the_processes_flag_and_its_old_name(tmp_path):
    assert serve(tmp_path, "--processes", "2") == [NEEDS_A_PORT]
    assert serve(tmp_path, "--workers", "2") == ["--workers is deprecated, use --processes", NEEDS_A_PORT]
    assert serve(tmp_path, "--processes", "2", "--workers", "1") == [
        "--workers is deprecated, use --processes; ignored because --processes is set",
        NEEDS_A_PORT,
    ]
