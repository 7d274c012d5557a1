"""TLS and mutual TLS, with a certificate authority made by the test (openssl)."""

import asyncio
import ssl
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from websockets import Subprotocol
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake

import onnx_models
from harness import ONE, ServerProcess, deploy, outputs_of, request
from mds.v1 import inference_service_pb2 as pb
from mds.v1 import model_service_pb2


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by the CA."""
    d = tmp_path_factory.mktemp("pki")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=MDS test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    for name, extension in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        (d / f"{name}.ext").write_text(extension + "\n")
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.pem",
            cwd=d,
        )
    return d


def credentials(pki: Path, client_certificate: bool) -> grpc.ChannelCredentials:
    key = (pki / "client.key").read_bytes() if client_certificate else None
    chain = (pki / "client.pem").read_bytes() if client_certificate else None
    return grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes(), key, chain)


def test_tls_serves_only_tls_clients(pki, tmp_path):
    server = ServerProcess(
        tmp_path, credentials(pki, False), mds_tls_cert_file=pki / "server.pem", mds_tls_key_file=pki / "server.key"
    ).start()
    try:
        deploy(server, "adder", onnx_models.add_two())
        assert outputs_of(server.inference.Predict(request("adder", {"a": ONE, "b": ONE})))["z"].tolist() == [2.0]
        plaintext = grpc.insecure_channel(server.address)
        with pytest.raises(grpc.RpcError) as caught:
            plaintext.unary_unary("/mds.v1.ModelService/ListModels")(b"", timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        listed = subprocess.run(
            [
                sys.executable,
                "-m",
                "mds_grpc",
                "models",
                "list",
                "--server",
                server.address,
                "--tls-ca",
                str(pki / "ca.pem"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0 and listed.stdout.startswith("adder\t1\t"), listed.stderr
    finally:
        assert server.stop() == 0


def mutual_tls_server(pki, tmp_path) -> ServerProcess:
    """A server with TLS that requires client certificates signed by the test CA."""
    return ServerProcess(
        tmp_path,
        credentials(pki, True),
        mds_tls_cert_file=pki / "server.pem",
        mds_tls_key_file=pki / "server.key",
        mds_tls_client_ca_file=pki / "ca.pem",
    ).start()


def test_mutual_tls_requires_a_client_certificate_from_the_ca(pki, tmp_path):
    server = mutual_tls_server(pki, tmp_path)
    try:
        assert list(server.models.ListModels(model_service_pb2.ListModelsRequest()).models) == []
        anonymous = grpc.secure_channel(server.address, credentials(pki, False))
        with pytest.raises(grpc.RpcError) as caught:
            anonymous.unary_unary("/mds.v1.ModelService/ListModels")(b"", timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        listed = subprocess.run(
            [
                sys.executable,
                "-m",
                "mds_grpc",
                "models",
                "list",
                "--server",
                server.address,
                "--tls-ca",
                str(pki / "ca.pem"),
                "--tls-cert",
                str(pki / "client.pem"),
                "--tls-key",
                str(pki / "client.key"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
    finally:
        assert server.stop() == 0


def test_the_websocket_port_serves_the_same_tls_and_client_certificates(pki, tmp_path):
    server = mutual_tls_server(pki, tmp_path)
    url = f"wss://localhost:{server.websocket_port}/v1/predictions:ws"

    async def predict(context: ssl.SSLContext) -> pb.PredictStreamResponse:
        async with connect(url, ssl=context, subprotocols=[Subprotocol("mds.v1.proto")]) as socket:
            await socket.send(request("adder", {"a": ONE, "b": ONE}).SerializeToString())
            return pb.PredictStreamResponse.FromString(await socket.recv())

    try:
        deploy(server, "adder", onnx_models.add_two())
        context = ssl.create_default_context(cafile=pki / "ca.pem")
        context.load_cert_chain(pki / "client.pem", pki / "client.key")
        assert outputs_of(asyncio.run(predict(context)).response)["z"].tolist() == [2.0]
        anonymous = ssl.create_default_context(cafile=pki / "ca.pem")
        with pytest.raises((ssl.SSLError, ConnectionError, InvalidHandshake)):
            asyncio.run(predict(anonymous))
    finally:
        assert server.stop() == 0
