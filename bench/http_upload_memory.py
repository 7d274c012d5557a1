"""Peak RSS growth of Envoy and of the server during streamed HTTP uploads through Envoy (docs/rest.md).

`python bench/http_upload_memory.py [--s3] [--single-mib 300]` uploads (1) the 1 GiB external-data model of
workload (d) (models.big_model) as multipart/form-data with `curl -F`, and (2) a single-file model of
--single-mib MiB as a plain body with `curl --data-binary`, and prints a Markdown table: each process's peak
RSS (VmHWM, reset before each upload) minus its RSS just before, and the peak RSS of the helper process that
checked the model, if one did (from the server's log). --s3 stores on MinIO + FerretDB (scripts/services.sh)
instead of the embedded default.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "scripts")]
import models  # noqa: E402
from harness import REPO, memory_kib  # noqa: E402
from local_machine import CACHE, free_port  # noqa: E402


def single_file_model(path: Path, mib: int) -> Path:
    """x[batch, 1024] @ W[1024, n]: W inline in the .onnx file, about `mib` MiB."""
    if path.exists():
        return path
    columns = mib * 256
    weights = np.random.default_rng(0).standard_normal((1024, columns), np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "single",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", columns])],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="mds-bench")
    model.ir_version = 8
    onnx.save_model(model, str(path.with_suffix(".part")))
    path.with_suffix(".part").rename(path)
    return path


def wait_for(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["curl", "-sf", "-o", "/dev/null", url]).returncode != 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"error: {url} did not answer")
        time.sleep(0.1)


def helper_peaks(log: Path) -> list[float]:
    """Peak RSS, in MiB, of each helper process that checked a model so far."""
    lines = map(json.loads, log.read_text().splitlines()) if log.exists() else []
    return [line["peak_rss_mib"] for line in lines if line["message"] == "helper process ended"]


def measure(pids: dict[str, int], curl: list[str], log: Path) -> dict[str, float]:
    """Run curl; each process's peak RSS growth in MiB, the helper's peak RSS (0: none) and the seconds it took."""
    helpers = len(helper_peaks(log))
    before = {name: memory_kib(pid, "VmRSS") for name, pid in pids.items()}
    for pid in pids.values():
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM, the peak RSS
    start = time.perf_counter()
    reply = subprocess.run(["curl", "-sS", "--fail-with-body", *curl], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if reply.returncode != 0:
        raise SystemExit(f"error: upload failed: {reply.stdout} {reply.stderr}")
    growth = {name: (memory_kib(pid, "VmHWM") - before[name]) / 1024 for name, pid in pids.items()}
    return {**growth, "helper": max(helper_peaks(log)[helpers:], default=0), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--s3", action="store_true", help="MinIO + FerretDB instead of the embedded storage")
    parser.add_argument("--single-mib", type=int, default=300, help="size of the single-file model")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="http-upload-memory-"))
    env = {**os.environ, "MDS_DRAIN_SECONDS": "0", "MDS_WEBSOCKET_PORT": "0", "MDS_METRICS_PORT": "0"}
    if args.s3:
        script = str(REPO / "scripts" / "services.sh")
        subprocess.run([script, "start"], check=True, stdout=subprocess.DEVNULL)
        lines = subprocess.run([script, "env"], check=True, capture_output=True, text=True).stdout.split()
        namespace = f"bench-http-{os.getpid()}"
        env.update(dict(line.split("=", 1) for line in lines if not line.startswith("MDS_REDIS")))
        env.update(MDS_MONGO_DATABASE=namespace, MDS_S3_BUCKET=namespace, MDS_AUTH="off")
    grpc_port, http_port = free_port(), free_port()
    log = open(work / "processes.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mds_grpc", "serve", "--grpc-port", str(grpc_port), "--data-dir", str(work / "data")]
        + ["--log-dir", str(work / "logs")],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    envoy = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "run_envoy.py"), "--listen-port", str(http_port)]
        + ["--grpc-port", str(grpc_port), "--admin-port", str(free_port()), "--config-out", str(work / "envoy.yaml")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{http_port}"
        wait_for(f"{url}/v1/models")
        pids = {"Envoy": envoy.pid, "server": server.pid}
        big = models.big_model()
        single = single_file_model(CACHE / "bench-models" / f"single-{args.single_mib}.onnx", args.single_mib)
        rows = [
            (
                "multipart: big.onnx + big.onnx.data (`curl -F`)",
                big.stat().st_size + (big.parent / models.BIG_DATA).stat().st_size,
                measure(
                    pids,
                    ["-F", f"model=@{big}", "-F", f"{models.BIG_DATA}=@{big.parent / models.BIG_DATA}"]
                    + [f"{url}/v1/models/big:upload"],
                    work / "logs" / "mds.log",
                ),
            ),
            (
                "plain body: one .onnx file (`curl --data-binary`)",
                single.stat().st_size,
                measure(
                    pids,
                    ["--data-binary", f"@{single}", "-H", "Content-Type: application/octet-stream"]
                    + [f"{url}/v1/models/single:upload"],
                    work / "logs" / "mds.log",
                ),
            ),
        ]
    finally:
        for process in (envoy, server):
            process.terminate()
            process.wait(60)
    storage = "MinIO + FerretDB" if args.s3 else "embedded (local files + SQLite)"
    print(f"Storage: {storage}\n")
    print("| upload | MiB | seconds | Envoy peak RSS growth MiB | server peak RSS growth MiB | helper peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, size, figures in rows:
        print(
            f"| {name} | {size / 2**20:,.0f} | {figures['seconds']:.1f} | {figures['Envoy']:.0f} "
            f"| {figures['server']:.0f} | {figures['helper']:.0f} |"
        )


if __name__ == "__main__":
    main()
