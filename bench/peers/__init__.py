"""The peers MDS is measured against, each run from its own virtualenv ($MDS_CACHE/peers/NAME, made by
install.sh) on the same ONNX file with onnxruntime on one intra-op thread, speaking V2 gRPC."""

import contextlib
import json
import subprocess
import time
from pathlib import Path

import grpc

from harness import Target
from local_machine import CACHE, free_port
from mds.oip import grpc_service_pb2 as oip

HERE = Path(__file__).resolve().parent
NAMES = ("KServe", "MLServer")


def install() -> None:
    subprocess.run([str(HERE / "install.sh")], check=True)


def _wait_until_ready(target: Target, model: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(grpc.RpcError):
            if target.call(
                "inference.GRPCInferenceService/ModelReady",
                oip.ModelReadyRequest(name=model),
                oip.ModelReadyResponse,
                timeout=5,
            ).ready:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{target.name} did not make {model} ready; see {target.log}")


def start(name: str, model: str, path: Path, work: Path) -> Target:
    """Serve PATH as MODEL with the peer NAME; returns once the model is ready."""
    port = free_port()
    python = CACHE / "peers" / name.lower() / "bin" / "python"
    if name == "KServe":
        argv = [str(python), str(HERE / "kserve_onnx.py"), str(port), str(free_port()), model, str(path)]
        env = {}
    else:
        folder = work / "mlserver"
        (folder / model).mkdir(parents=True, exist_ok=True)
        # parallel_workers=0 runs the model in the server process (its worker pool crashes with uvloop >= 0.22);
        # its gRPC interceptor logs every call at INFO.
        (folder / "settings.json").write_text(
            json.dumps(
                {
                    "parallel_workers": 0,
                    "grpc_port": port,
                    "http_port": free_port(),
                    "metrics_port": free_port(),
                    "logging_settings": {
                        "version": 1,
                        "disable_existing_loggers": False,
                        "loggers": {"mlserver.grpc": {"level": "WARNING"}},
                    },
                }
            )
        )
        (folder / model / "model-settings.json").write_text(
            json.dumps({"name": model, "implementation": "mlserver_onnx.OnnxRuntime", "parameters": {"uri": str(path)}})
        )
        argv = [str(python.parent / "mlserver"), "start", str(folder)]
        env = {"PYTHONPATH": str(HERE)}
    target = Target(name, argv, port, env=env, log=work / f"{name}.log")
    _wait_until_ready(target, model)
    return target
