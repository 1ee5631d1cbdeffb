"""The bridge's Kubernetes client inside a pod: the service account, not a kubeconfig.

The fake API server serves HTTPS with a certificate of its own (as a real API server does);
the "pod" has ``KUBERNETES_SERVICE_HOST``/``_PORT`` and a service account directory with the
token and the cluster CA. Services are created and deleted with those; a wrong CA fails at
once (not retried: it cannot heal) and a missing service account fails clearly.
"""

from __future__ import annotations

import datetime
import ipaddress
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from jupyterhub_outpost_mq.bridge.errors import ConfigurationError, ServiceApiError
from jupyterhub_outpost_mq.bridge.k8s_services import ServiceManager
from jupyterhub_outpost_mq.bridge.retry import Backoff
from jupyterhub_outpost_mq.schemas import ServiceSpec

from .services import Process, free_port, port_open, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

TOKEN = "in-cluster-token"


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class TlsKubernetes(Process):
    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.cert, key = self_signed(directory, "apiserver")
        argv = [sys.executable, "-m", "tests.fakes.k8s_api", "--port", str(self.port), "--token", TOKEN]
        super().__init__("fake-k8s-tls", [*argv, "--tls-cert", str(self.cert), "--tls-key", str(key)], directory)

    def get(self, path: str) -> requests.Response:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        return requests.get(f"https://127.0.0.1:{self.port}{path}", headers=headers, verify=self.cert, timeout=10)


@pytest.fixture(scope="module")
def apiserver(workdir: Path) -> Iterator[TlsKubernetes]:
    directory = workdir / "k8s-incluster"
    directory.mkdir()
    server = TlsKubernetes(directory)
    server.start()
    wait_for(lambda: port_open(server.port), 20, "fake Kubernetes API (HTTPS)")
    yield server
    server.stop()


def pod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, apiserver: TlsKubernetes, ca: Path) -> ServiceManager:
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(TOKEN)
    (account / "ca.crt").write_bytes(ca.read_bytes())
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(apiserver.port))
    backoff = Backoff(initial=0.1, maximum=0.5)
    return ServiceManager(selector={"app": "outpost-bridge"}, service_account_dir=str(account), backoff=backoff)


async def test_services_are_made_with_the_pods_service_account(
    apiserver: TlsKubernetes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = pod(tmp_path, monkeypatch, apiserver, apiserver.cert)
    await services.start()
    spec = ServiceSpec(name="incluster-a", namespace="default", labels={"hub": "test"})
    path = "/api/v1/namespaces/default/services/incluster-a"
    try:
        address = await services.ensure(spec, 31234, time.time() + 20)
        assert address == "incluster-a.default.svc:31234"
        made = apiserver.get(path)
        assert made.status_code == 200, made.text
        assert made.json()["spec"]["selector"] == {"app": "outpost-bridge"}
        assert made.json()["metadata"]["labels"]["hub"] == "test"
        await services.delete(spec, time.time() + 20)
        assert apiserver.get(path).status_code == 404
    finally:
        await services.close()


async def test_an_api_server_the_cluster_ca_did_not_sign_is_refused(
    apiserver: TlsKubernetes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other, _ = self_signed(tmp_path, "other-ca")
    services = pod(tmp_path, monkeypatch, apiserver, other)
    await services.start()
    try:
        with pytest.raises(ServiceApiError, match="certificate was refused"):
            await services.ensure(ServiceSpec(name="incluster-b", namespace="default"), 31235, time.time() + 30)
    finally:
        await services.close()
    assert apiserver.get("/api/v1/namespaces/default/services/incluster-b").status_code == 404


async def test_outside_a_pod_the_error_names_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    services = ServiceManager(selector={"app": "x"}, service_account_dir=str(tmp_path))
    with pytest.raises(ConfigurationError, match="KUBERNETES_SERVICE_HOST"):
        await services.start()
