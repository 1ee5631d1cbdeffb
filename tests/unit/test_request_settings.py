"""A command's own TLS mistake is that command's final error, never the Outpost's (issue 11
item 12): a listed but missing or invalid ``ca_certs``/``client_cert`` file, or a CA that does
not verify the Outpost's certificate, fails the command at once (no retries to the deadline)
and neither opens nor closes the circuit that every hub of the Outpost shares.

In process, with a real TLS server on loopback (certificates made here with ``cryptography``).
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from jupyterhub_outpost_mq.bridge.circuit import CircuitBreaker, GuardedOutpostClient
from jupyterhub_outpost_mq.bridge.errors import RequestSettingsError
from jupyterhub_outpost_mq.bridge.journal import StartJournal
from jupyterhub_outpost_mq.bridge.outpost_access import OutpostAccess
from jupyterhub_outpost_mq.bridge.pipeline import Pipeline
from jupyterhub_outpost_mq.bridge.retry import Backoff
from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    Envelope,
    HttpOptions,
    OutpostTarget,
    PollCommand,
    ProgressEvent,
    ServerRef,
)
from jupyterhub_outpost_mq.schemas.base import new_id

aio = pytest.mark.asyncio(loop_scope="session")


def _certificate(subject: str, key: Any, issuer: x509.Certificate | None, issuer_key: Any) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer.subject if issuer else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class TlsFiles:
    ca: Path  # signed the Outpost's certificate
    other_ca: Path  # did not
    garbage: Path  # not a certificate at all
    missing: Path  # listed, never written
    server_cert: Path
    server_key: Path

    @property
    def listed(self) -> list[str]:
        return [str(p) for p in (self.ca, self.other_ca, self.garbage, self.missing)]


def _pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    ca_key, other_key, server_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _certificate("test CA", ca_key, None, ca_key)
    other = _certificate("other CA", other_key, None, other_key)
    server = _certificate("outpost", server_key, ca, ca_key)
    encoded = serialization.Encoding.PEM
    return TlsFiles(
        ca=_pem(tmp_path / "ca.pem", ca.public_bytes(encoded)),
        other_ca=_pem(tmp_path / "other-ca.pem", other.public_bytes(encoded)),
        garbage=_pem(tmp_path / "garbage.pem", b"-----BEGIN CERTIFICATE-----\nnot base64\n"),
        missing=tmp_path / "missing.pem",
        server_cert=_pem(tmp_path / "server.pem", server.public_bytes(encoded)),
        server_key=_pem(
            tmp_path / "server.key",
            server_key.private_bytes(encoded, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        ),
    )


@pytest_asyncio.fixture(loop_scope="session")
async def outpost(tls_files: TlsFiles) -> AsyncIterator[str]:
    """An HTTPS Outpost on loopback answering every poll ``{"status": null}``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_files.server_cert, tls_files.server_key)
    app = web.Application()
    app.router.add_get("/services/{name}/{start_id}", lambda request: web.json_response({"status": None}))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    yield f"https://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    await runner.cleanup()


@pytest_asyncio.fixture(loop_scope="session")
async def client(tls_files: TlsFiles) -> AsyncIterator[GuardedOutpostClient]:
    breaker = CircuitBreaker(threshold=3, cooldown=Backoff(initial=60, maximum=60, jitter=0))
    guarded = GuardedOutpostClient(breaker, access=OutpostAccess(["https://127.0.0.1:*"], tls_files=tls_files.listed))
    await guarded.start()
    yield guarded
    await guarded.close()


async def poll(client: GuardedOutpostClient, url: str, options: HttpOptions, tmp_path: Path) -> CommandResult:
    pipeline = Pipeline(client, StartJournal(tmp_path / "j.sqlite"), backoff=Backoff(initial=0.05, maximum=0.2))
    body = PollCommand(target=OutpostTarget(url=f"{url}/services", http=options), name="ann")
    command = Envelope(
        id=new_id(), hub="hub", server=ServerRef(user="ann", start_id="s1"), deadline=time.time() + 20, body=body
    )

    async def emit(event: ProgressEvent) -> None:
        pass

    answer = await pipeline.run(command, redelivered=False, emit=emit)
    assert isinstance(answer.body, CommandResult)
    return answer.body


def mistakes(files: TlsFiles) -> dict[str, HttpOptions]:
    return {
        "missing CA file": HttpOptions(ca_certs=str(files.missing)),
        "CA file that is no certificate": HttpOptions(ca_certs=str(files.garbage)),
        "client certificate that is no certificate": HttpOptions(
            ca_certs=str(files.ca), client_cert=str(files.garbage), client_key=str(files.garbage)
        ),
        "CA that did not sign the Outpost's certificate": HttpOptions(ca_certs=str(files.other_ca)),
    }


@aio
async def test_a_tls_mistake_is_a_final_error_of_the_command(
    client: GuardedOutpostClient, outpost: str, tls_files: TlsFiles, tmp_path: Path
) -> None:
    assert (await poll(client, outpost, HttpOptions(ca_certs=str(tls_files.ca)), tmp_path)).ok  # the setup works
    for what, options in mistakes(tls_files).items():
        began = time.monotonic()
        result = await poll(client, outpost, options, tmp_path)
        assert time.monotonic() - began < 2, what  # not retried until the 20 s deadline
        assert not result.ok and result.error is not None and result.error.kind == "invalid", (what, result)
        assert not result.error.retryable and str(tls_files.missing) not in result.error.summary, what


@aio
async def test_tls_mistakes_neither_open_nor_close_the_outposts_circuit(
    client: GuardedOutpostClient, outpost: str, tls_files: TlsFiles
) -> None:
    breaker = client.breaker
    for _ in range(2):
        breaker.failure(outpost, "connection refused")  # one short of the threshold (3)
    for what, options in mistakes(tls_files).items():
        with pytest.raises(RequestSettingsError):
            await client.call("GET", f"{outpost}/services/ann/s1", headers={}, options=options, time_left=5)
        assert breaker.state(outpost) == "closed", what  # did not count as a failure ...
    breaker.failure(outpost, "connection refused")
    assert breaker.state(outpost) == "open"  # ... nor as a success that resets the count
    files = {what: options for what, options in mistakes(tls_files).items() if "did not sign" not in what}
    for what, options in files.items():
        began = time.monotonic()
        # A file that cannot be loaded fails at once, not after waiting for the open circuit
        # (a CA that does not verify the Outpost is only found out by connecting).
        with pytest.raises(RequestSettingsError):
            await client.call("GET", f"{outpost}/services/ann/s1", headers={}, options=options, time_left=5)
        assert time.monotonic() - began < 1 and breaker.state(outpost) == "open", what
