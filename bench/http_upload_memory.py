"""Peak RSS growth of Envoy and of the server during streamed HTTP uploads through Envoy (docs/rest.md).

`python bench/http_upload_memory.py [--s3] [--single-mib 300]` uploads (1) the 1 GiB external-data model of
workload (d) (models.big_model) as multipart/form-data with `curl -F`, and (2) a single-file model of
--single-mib MiB as a plain body with `curl --data-binary`, and prints a Markdown table: each process's peak
RSS (VmHWM, reset before each upload) minus its RSS just before, and the peak RSS of the helper process that
checked the model, if one did (from the server's log). --s3 stores on MinIO + FerretDB (scripts/services.sh)
instead of the embedded default.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "scripts")]
import models  # noqa: E402
from harness import REPO, peak_memory  # noqa: E402
from local_machine import free_port  # noqa: E402


def wait_for(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["curl", "-sf", "-o", "/dev/null", url]).returncode != 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"error: {url} did not answer")
        time.sleep(0.1)


def curl(arguments: list[str]) -> None:
    reply = subprocess.run(["curl", "-sS", "--fail-with-body", *arguments], capture_output=True, text=True)
    if reply.returncode != 0:
        raise SystemExit(f"error: upload failed: {reply.stdout} {reply.stderr}")


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
        single = models.single_file_model(args.single_mib)
        rows = [
            (
                "multipart: big.onnx + big.onnx.data (`curl -F`)",
                big.stat().st_size + (big.parent / models.BIG_DATA).stat().st_size,
                peak_memory(
                    pids,
                    lambda: curl(
                        ["-F", f"model=@{big}", "-F", f"{models.BIG_DATA}=@{big.parent / models.BIG_DATA}"]
                        + [f"{url}/v1/models/big:upload"]
                    ),
                    work / "logs" / "mds.log",
                ),
            ),
            (
                "plain body: one .onnx file (`curl --data-binary`)",
                single.stat().st_size,
                peak_memory(
                    pids,
                    lambda: curl(
                        ["--data-binary", f"@{single}", "-H", "Content-Type: application/octet-stream"]
                        + [f"{url}/v1/models/single:upload"]
                    ),
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
            f"| {figures['server']:.0f} | {'–' if figures['helper'] is None else format(figures['helper'], '.0f')} |"
        )


if __name__ == "__main__":
    main()
