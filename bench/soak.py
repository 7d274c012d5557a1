"""A bounded soak: mixed upload / predict / stream / job load on a loopback MDS, stopping by itself.

    python bench/soak.py [--seconds 180] [--out bench/results/soak.json] [--publish]

Fails (exit 1) when a request that should succeed fails, or when the server's RSS or open
file descriptors grow past the tolerance between the end of the warm-up and the end.
bench/results/ is ignored by git; --publish also copies a passing report to the committed
snapshot, bench/published/soak.json.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from mds.v1 import inference_service_pb2 as pb
from mds.v1 import (
    inference_service_pb2_grpc,
    job_service_pb2,
    job_service_pb2_grpc,
    model_service_pb2,
    model_service_pb2_grpc,
)
from mds_grpc.api.tensors import from_array

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "scripts")]
from local_machine import free_port  # noqa: E402
from models import mlp  # noqa: E402

PUBLISHED = Path(__file__).parent / "published" / "soak.json"
RSS_TOLERANCE_MIB = 64
FD_TOLERANCE = 8


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Load:
    """Workers that each repeat one kind of request until `stop` is set, counting failures."""

    def __init__(self, address: str, model: bytes):
        channel = grpc.insecure_channel(address)
        self.models = model_service_pb2_grpc.ModelServiceStub(channel)
        self.inference = inference_service_pb2_grpc.InferenceServiceStub(channel)
        self.jobs = job_service_pb2_grpc.JobServiceStub(channel)
        self.model = model
        self.request = pb.PredictRequest(
            model="soak", inputs=[from_array("x", np.ones((1, 784), np.float32), raw=True)]
        )
        self.stop = threading.Event()
        self.counts = {"predict": 0, "stream": 0, "upload": 0, "job": 0}
        self.failures: list[str] = []

    def _repeat(self, kind: str, action) -> None:
        while not self.stop.is_set():
            try:
                action()
                self.counts[kind] += 1
            except grpc.RpcError as error:
                self.failures.append(f"{kind}: {error.code().name}: {error.details()}")

    def predict(self) -> None:
        self.inference.Predict(self.request, timeout=30)

    def stream(self) -> None:
        replies = list(self.inference.PredictStream(iter([self.request] * 20), timeout=30))
        errors = [r.error.message for r in replies if r.HasField("error")]
        if len(replies) != 20 or errors:
            raise RuntimeError(f"stream: {len(replies)} replies, errors {errors[:1]}")

    def upload(self) -> None:
        header = model_service_pb2.ModelHeader(name="soak-upload")
        model = self.models.UploadModel(
            iter(
                [
                    model_service_pb2.UploadModelRequest(header=header),
                    model_service_pb2.UploadModelRequest(chunk=self.model),
                ]
            ),
            timeout=60,
        )
        self.models.DeleteModel(model_service_pb2.DeleteModelRequest(name="soak-upload", version=model.version))

    def job(self) -> None:
        rows = np.ones((64, 784), np.float32)
        job = self.jobs.CreateJob(
            job_service_pb2.CreateJobRequest(model="soak", batch_rows=16, inputs=[from_array("x", rows, raw=True)])
        )
        final = list(self.jobs.WatchJob(job_service_pb2.WatchJobRequest(id=job.id), timeout=60))[-1]
        if final.state != job_service_pb2.JOB_STATE_SUCCEEDED:
            raise RuntimeError(f"job ended {final.state}: {final.error}")

    def start(self) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._repeat, args=(kind, action), daemon=True)
            for kind, action in (
                ("predict", self.predict),
                ("predict", self.predict),
                ("stream", self.stream),
                ("upload", self.upload),
                ("job", self.job),
            )
        ]
        for thread in threads:
            thread.start()
        return threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "soak.json")
    parser.add_argument(
        "--publish", action="store_true", help="also copy a passing report to bench/published/soak.json (committed)"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mds-soak-"))
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mds_grpc",
            "serve",
            "--grpc-port",
            str(port),
            "--data-dir",
            str(work / "data"),
            "--log-dir",
            str(work / "logs"),
        ],
        env={**os.environ, "MDS_DRAIN_SECONDS": "0", "MDS_WEBSOCKET_PORT": str(free_port())},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        address = f"127.0.0.1:{port}"
        grpc.channel_ready_future(grpc.insecure_channel(address)).result(timeout=60)
        model = mlp()
        load = Load(address, model)
        load.models.UploadModel(
            iter(
                [
                    model_service_pb2.UploadModelRequest(header=model_service_pb2.ModelHeader(name="soak")),
                    model_service_pb2.UploadModelRequest(chunk=model),
                ]
            )
        )
        threads = load.start()
        warmup = args.seconds * 0.2
        time.sleep(warmup)  # this is a load generator's clock, not a test's synchronisation
        start = {"rss_mib": rss_mib(server.pid), "open_fds": open_fds(server.pid)}
        time.sleep(args.seconds - warmup)
        end = {"rss_mib": rss_mib(server.pid), "open_fds": open_fds(server.pid)}
        load.stop.set()
        for thread in threads:
            thread.join(60)
    finally:
        server.terminate()
        server.wait(60)
    report = {
        "seconds": args.seconds,
        "after_warmup": start,
        "end": end,
        "requests": load.counts,
        "failures": load.failures[:20],
        "failure_count": len(load.failures),
        "rss_growth_mib": end["rss_mib"] - start["rss_mib"],
        "fd_growth": end["open_fds"] - start["open_fds"],
        "tolerance": {"rss_mib": RSS_TOLERANCE_MIB, "fds": FD_TOLERANCE},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    healthy = (
        not load.failures and report["rss_growth_mib"] <= RSS_TOLERANCE_MIB and report["fd_growth"] <= FD_TOLERANCE
    )
    if healthy and args.publish:
        shutil.copyfile(args.out, PUBLISHED)
        print(f"published: {PUBLISHED}", file=sys.stderr)
    sys.exit(0 if healthy else 1)


if __name__ == "__main__":
    main()
