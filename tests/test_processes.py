"""`mds serve --processes 2`: two serving processes share the port, the stores and the models; SIGTERM stops both."""

import json
import os
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

import onnx_models
from harness import ServerProcess, backend_env, outputs_of, request, upload_requests, wait_until
from mds.v1 import inference_service_pb2_grpc, model_service_pb2


def access_pids(server: ServerProcess) -> dict[int, int]:
    """Predict calls served, per process, from each process's own log file."""
    served = {}
    for process in range(2):
        lines = (server.log_dir / f"mds-{process}.log").read_text().splitlines()
        served[process] = sum(1 for e in map(json.loads, lines) if e.get("method", "").endswith("/Predict"))
    return served


def started_pids(server: ServerProcess) -> list[int]:
    lines = (server.log_dir / "mds.log").read_text().splitlines()
    return next(e["pids"] for e in map(json.loads, lines) if e["message"] == "serving processes started")


def predict_in_both(server: ServerProcess, predict_request) -> list:
    """24 predictions, each on a new connection, which the kernel hands to either process; both must serve."""
    replies = []
    for _ in range(24):
        with grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
            replies.append(stub.Predict(predict_request, timeout=30))
    wait_until(lambda: sum(access_pids(server).values()) == 24, what="24 access lines")
    assert all(count > 0 for count in access_pids(server).values()), access_pids(server)
    return replies


def test_two_processes_share_the_port_and_the_models(tmp_path):
    server = ServerProcess(tmp_path, mds_processes=2).start()
    try:
        server.models.UploadModel(upload_requests("adder", onnx_models.add_two()), timeout=120)
        ones = np.ones(2, np.float32)
        for reply in predict_in_both(server, request("adder", {"a": ones, "b": ones})):
            assert outputs_of(reply)["z"].tolist() == [2.0, 2.0]
    finally:
        assert server.stop() == 0
    pids = started_pids(server)
    assert len(pids) == 2 and not any(Path(f"/proc/{pid}").exists() for pid in pids)


def test_the_supervisor_loads_neither_onnxruntime_nor_grpc_nor_a_store(tmp_path):
    """Only the serving processes (and the helper that prepared the storage) map those libraries."""
    server = ServerProcess(tmp_path, mds_processes=2).start()
    try:
        supervisor = Path(f"/proc/{server.process.pid}/maps").read_text()
        serving = Path(f"/proc/{started_pids(server)[0]}/maps").read_text()
        for library in ("onnxruntime", "cygrpc", "_sqlite3"):  # the embedded store's metadata is SQLite
            assert library in serving and library not in supervisor, library
    finally:
        assert server.stop() == 0


def mapped_files(pid: int, suffix: str) -> set[tuple[str, str]]:
    """(device, inode) of each file a process maps whose path ends with `suffix`."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {(fields[3], fields[4]) for fields in map(str.split, lines) if fields[-1].endswith(suffix)}


def s3_env(services: dict[str, str]) -> dict[str, str]:
    """MongoDB and S3 in a database and bucket of their own; jobs are not used here, so no Redis."""
    env = backend_env(services, f"mds-test-{os.getpid()}-{time.time_ns()}")
    return {key: value for key, value in env.items() if "REDIS" not in key}


@pytest.fixture(params=["embedded", "mongo-s3"])
def storage_env(request) -> dict[str, str]:
    """The embedded default, or MongoDB and S3."""
    if request.param == "embedded":
        return {}
    return s3_env(request.getfixturevalue("services"))


def upload_mapped(server: ServerProcess, tmp_path: Path) -> None:
    """Upload "mapped": a MatMul whose 16 KiB of weights are in external data, at the servers' 16 KiB threshold."""
    model = onnx_models.save_with_external_data(tmp_path / "model", rows=64, columns=64)
    data = {"model.onnx.data": (model.parent / "model.onnx.data").read_bytes()}
    server.models.UploadModel(upload_requests("mapped", model.read_bytes(), side_files=data), timeout=120)


def switched(server: ServerProcess, processes: int) -> bool:
    """Whether each serving process logged that it runs the version on the host's prepacked copy."""
    names = ["mds.log"] if processes == 1 else [f"mds-{i}.log" for i in range(processes)]
    return all("prepacked weights in use" in (server.log_dir / name).read_text() for name in names)


def test_the_processes_map_one_copy_of_big_external_data(tmp_path, storage_env):
    """Weights in external data over MDS_SHARED_WEIGHTS_MIN_BYTES stay mapped from one file of the host (the
    stored blob, or one download from S3), then from the host's one prepacked copy: every serving process maps
    the same inode, so the page cache holds them once."""
    server = ServerProcess(tmp_path / "server", mds_processes=2, mds_shared_weights_min_bytes=16384, **storage_env)
    server.start()
    try:
        upload_mapped(server, tmp_path)
        x = request("mapped", {"x": np.ones((1, 64), np.float32)})
        predict_in_both(server, x)
        wait_until(lambda: switched(server, 2), what="both processes on the prepacked copy")
        first, second = (mapped_files(pid, ".prepacked~/model.onnx.data") for pid in started_pids(server))
        assert first and first == second
    finally:
        assert server.stop() == 0


def test_the_host_copy_goes_with_the_last_folder_linking_it(tmp_path, services):
    """On S3 the host's copy of a file (MDS_DATA_DIR/models/.files), and the prepacked copy of the version, are
    removed once no model folder links them."""
    server = ServerProcess(tmp_path / "server", mds_shared_weights_min_bytes=16384, **s3_env(services)).start()
    copies = server.data_dir / "models" / ".files"
    try:
        upload_mapped(server, tmp_path)
        server.inference.Predict(request("mapped", {"x": np.ones((1, 64), np.float32)}), timeout=30)
        assert len(list(copies.iterdir())) == 2  # model.onnx and its data
        wait_until(lambda: switched(server, 1), what="the version on its prepacked copy")
        prepacked = server.data_dir / "prepacked"
        assert len(list(prepacked.iterdir())) == 2  # the copy and its lock file
        server.models.DeleteModel(model_service_pb2.DeleteModelRequest(name="mapped", version=1), timeout=30)
        wait_until(lambda: not any(copies.iterdir()), what="the host's copies to go")
        wait_until(lambda: not any(prepacked.iterdir()), what="the prepacked copy to go")
    finally:
        assert server.stop() == 0


def test_when_one_process_dies_the_others_stop_and_the_supervisor_fails(tmp_path):
    server = ServerProcess(tmp_path, mds_workers=2).start()  # the deprecated name still works, and warns once
    assert server.root.joinpath("stdout.log").read_text().count("MDS_WORKERS is deprecated, use MDS_PROCESSES") == 1
    first, second = started_pids(server)
    os.kill(first, signal.SIGKILL)
    assert server.process.wait(60) == 1
    server.channel.close()
    server.stdout.close()
    assert not Path(f"/proc/{second}").exists()
    assert "a serving process exited" in (server.log_dir / "mds.log").read_text()


def test_a_stop_while_the_processes_are_still_starting_is_clean(tmp_path):
    """SIGTERM as soon as the serving processes exist, before they install handlers of their own: exit 0."""
    server = ServerProcess(tmp_path, mds_processes=2)
    server.launch()
    log = server.log_dir / "mds.log"
    wait_until(lambda: log.exists() and "serving processes started" in log.read_text(), what="the processes to start")
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(60) == 0
    server.stdout.close()


def test_every_process_preloads_what_any_process_used_after_a_restart(tmp_path):
    """Each process records what it loaded in a file of its own; at the next start the supervisor merges them,
    and each process loads all of them again in the background."""
    server = ServerProcess(tmp_path, mds_processes=2).start()
    server.models.UploadModel(upload_requests("adder", onnx_models.add_two()), timeout=120)  # one process warms it
    assert server.stop() == 0
    records = sorted(p.name for p in server.data_dir.glob("loaded-models*.json"))
    assert records == ["loaded-models-0.json", "loaded-models-1.json"]
    restarted = ServerProcess(tmp_path, mds_processes=2).start()
    try:
        logs = [restarted.log_dir / f"mds-{process}.log" for process in range(2)]
        wait_until(
            lambda: all(log.exists() and '"model preloaded"' in log.read_text() for log in logs), what="both to preload"
        )
    finally:
        assert restarted.stop() == 0
