"""The Outpost REST contract as :class:`OutpostApi` speaks it, against real servers on loopback.

An HTTP server that records what it was sent and answers from a script stands in for the
Outpost: the tests check the URLs (quoting), headers (``execution-type: async``), query
(``collect_logs``) and bodies the Outpost receives, and how its answers are read (404 on
DELETE is done, malformed listing entries are left out, flavors that are no JSON object are
refused). A TLS server that requires a client certificate (certificates made here with
``cryptography``) checks that its refusal of the bridge's certificate is a final error of the
command, neither retried nor counted against the Outpost's circuit.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from jupyterhub_outpost_mq.bridge.circuit import CircuitBreaker, GuardedOutpostClient
from jupyterhub_outpost_mq.bridge.errors import (
    MalformedAnswer,
    OutpostAnswerError,
    RequestSettingsError,
    TargetNotAllowed,
)
from jupyterhub_outpost_mq.bridge.journal import StartJournal
from jupyterhub_outpost_mq.bridge.outpost import OutpostClient
from jupyterhub_outpost_mq.bridge.outpost_access import OutpostAccess
from jupyterhub_outpost_mq.bridge.outpost_api import (
    ListedService,
    OutpostApi,
    Started,
    Status,
    Stopped,
)
from jupyterhub_outpost_mq.bridge.pipeline import Pipeline
from jupyterhub_outpost_mq.bridge.retry import Backoff
from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    Envelope,
    HttpOptions,
    OutpostTarget,
    ProgressEvent,
    ServerRef,
    StartCommand,
)
from jupyterhub_outpost_mq.schemas.base import new_id
from jupyterhub_outpost_mq.schemas.topology import url_origin
from tests.unit.test_request_settings import _certificate, _pem

aio = pytest.mark.asyncio(loop_scope="session")

AUTH = {"Authorization": "Basic aHViOnNlY3JldA=="}


@dataclass
class Received:
    method: str
    raw_path: str
    headers: dict[str, str]
    body: Any


@dataclass
class ScriptedOutpost:
    """Records every request; answers ``(status, JSON)`` from ``answers`` by ``"METHOD path"``
    (the decoded path), ``200 {}`` for anything not scripted."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    answers: dict[str, tuple[int, Any]] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        self.received.append(Received(request.method, request.raw_path, dict(request.headers), body))
        status, answer = self.answers.get(f"{request.method} {request.path}", (200, {}))
        return web.json_response(answer, status=status)

    def last(self) -> Received:
        return self.received[-1]


@pytest_asyncio.fixture(loop_scope="session")
async def outpost() -> AsyncIterator[ScriptedOutpost]:
    scripted = ScriptedOutpost()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", scripted.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    scripted.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    yield scripted
    await runner.cleanup()


@pytest_asyncio.fixture(loop_scope="session")
async def api() -> AsyncIterator[OutpostApi]:
    client = OutpostClient(access=OutpostAccess(["http://127.0.0.1:*"]))
    await client.start()
    yield OutpostApi(client)
    await client.close()


def target(outpost: ScriptedOutpost) -> OutpostTarget:
    return OutpostTarget(url=f"{outpost.url}/services", headers=AUTH)


def test_the_service_url_quotes_name_and_start_id_whole() -> None:
    services = OutpostTarget(url="https://outpost.example/services")
    assert OutpostApi.service_url(services, "ann", "s1") == "https://outpost.example/services/ann/s1"
    assert OutpostApi.service_url(services, "a b/c?d#e%", "x/y") == (
        "https://outpost.example/services/a%20b%2Fc%3Fd%23e%25/x%2Fy"
    )
    assert OutpostApi.service_url(services, "ann", "") == "https://outpost.example/services/ann/0"


@aio
async def test_odd_names_reach_the_outpost_as_one_path_segment_each(api: OutpostApi, outpost: ScriptedOutpost) -> None:
    await api.status(target(outpost), "ann smith?x=1#y%41ü", "1 2", time_left=5)
    assert outpost.last().raw_path == "/services/ann%20smith%3Fx=1%23y%2541%C3%BC/1%202"  # '=' needs none
    seen = len(outpost.received)
    with pytest.raises(TargetNotAllowed):  # a slash stays in its segment, encoded: the allow-list refuses it
        await api.status(target(outpost), "ann/../admin", "1", time_left=5)
    assert len(outpost.received) == seen
    await api.delete(target(outpost), "bob", "", time_left=5)
    assert (outpost.last().method, outpost.last().raw_path) == ("DELETE", "/services/bob/0")


@aio
async def test_a_404_on_delete_means_the_server_is_already_gone(api: OutpostApi, outpost: ScriptedOutpost) -> None:
    outpost.answers = {
        "DELETE /services/gone/1": (404, {"detail": "Item not found"}),
        "DELETE /services/here/1": (200, {"logs": ["stopping", 3]}),
        "DELETE /services/broken/1": (419, {"module": "m.", "class": "Boom", "args": ["no"]}),
    }
    assert await api.delete(target(outpost), "gone", "1", time_left=5) == Stopped(already_gone=True)
    assert await api.delete(target(outpost), "here", "1", time_left=5) == Stopped(logs=["stopping", "3"])
    with pytest.raises(OutpostAnswerError) as raised:
        await api.delete(target(outpost), "broken", "1", time_left=5)
    assert raised.value.status == 419  # only a 404 is done


@aio
async def test_an_async_start_and_stop_send_the_async_header(api: OutpostApi, outpost: ScriptedOutpost) -> None:
    outpost.answers = {"POST /services": (202, {"service": ""})}
    body = {"name": "ann", "user_options": {"start_id": "s1"}}
    assert await api.start(target(outpost), body, execution_async=True, time_left=5) == Started(service="")
    sent = outpost.last()
    assert (sent.method, sent.raw_path, sent.body) == ("POST", "/services", body)
    assert sent.headers["execution-type"] == "async" and sent.headers["Authorization"] == AUTH["Authorization"]
    await api.delete(target(outpost), "ann", "s1", execution_async=True, time_left=5)
    assert outpost.last().headers["execution-type"] == "async"

    outpost.answers = {"POST /services": (200, {"service": "10.0.0.5:8888"})}
    own = HttpOptions(user_agent="start-agent")  # request_kwargs_start replace the target's options
    started = await api.start(target(outpost), body, execution_async=False, options=own, time_left=5)
    assert started == Started(service="10.0.0.5:8888")
    assert "execution-type" not in outpost.last().headers and outpost.last().headers["User-Agent"] == "start-agent"
    await api.delete(target(outpost), "ann", "s1", time_left=5)
    assert "execution-type" not in outpost.last().headers


@aio
async def test_a_poll_asks_for_logs_only_when_told(api: OutpostApi, outpost: ScriptedOutpost) -> None:
    outpost.answers = {
        "GET /services/ann/s1": (200, {"status": 3, "logs": ["line 1", "line 2"]}),
        "GET /services/bob/s1": (200, {"status": True, "logs": "not a list"}),
        "GET /services/eve/s1": (200, ["not", "an", "object"]),
        "GET /services/nobody/s1": (404, {"detail": "Item not found"}),
    }
    found = await api.status(target(outpost), "ann", "s1", collect_logs=True, time_left=5)
    assert found == Status(status=3, logs=["line 1", "line 2"])
    assert outpost.last().raw_path == "/services/ann/s1?collect_logs=true"
    await api.status(target(outpost), "ann", "s1", time_left=5)
    assert outpost.last().raw_path == "/services/ann/s1"
    assert await api.status(target(outpost), "bob", "s1", time_left=5) == Status(status=None, logs=[])
    assert await api.status(target(outpost), "eve", "s1", time_left=5) == Status(status=None, logs=[])
    with pytest.raises(OutpostAnswerError) as raised:
        await api.status(target(outpost), "nobody", "s1", time_left=5)
    assert raised.value.status == 404
    assert await api.exists(target(outpost), "ann", "s1", time_left=5) is True
    assert await api.exists(target(outpost), "nobody", "s1", time_left=5) is False


@aio
async def test_the_listing_leaves_out_entries_it_cannot_be_about(api: OutpostApi, outpost: ScriptedOutpost) -> None:
    outpost.answers = {
        "GET /services/": (
            200,
            [
                {"name": "ann", "start_id": "s1", "start_pending": False, "stop_pending": False, "extra": 1},
                {"name": "bob", "start_id": 7, "start_pending": True, "stop_pending": True},
                {"name": "eve"},  # no start_id: the contract's "0"
                {"name": "ran", "start_id": "s1", "status": None},  # listed as running
                {"name": "ended", "start_id": "s1", "status": 3},
                {"name": "vague", "start_id": "s1", "status": "3"},  # no exit code: not a listed status
                "not an object",
                {"start_id": "s2"},  # no name
                {"name": "", "start_id": "s3"},
                {"name": 5, "start_id": "s4"},
                {"name": "odd", "start_id": ["s5"]},
            ],
        )
    }
    assert await api.list_services(target(outpost), time_left=5) == [
        ListedService(name="ann", start_id="s1"),
        ListedService(name="bob", start_id="7", start_pending=True, stop_pending=True),
        ListedService(name="eve", start_id="0"),
        ListedService(name="ran", start_id="s1", status=None, status_listed=True),
        ListedService(name="ended", start_id="s1", status=3, status_listed=True),
        ListedService(name="vague", start_id="s1", status=None, status_listed=False),
    ]
    assert outpost.last().raw_path == "/services/"
    outpost.answers = {"GET /services/": (200, {"not": "a list"})}
    assert await api.list_services(target(outpost), time_left=5) == []


@aio
async def test_flavors_must_be_a_json_object(api: OutpostApi, outpost: ScriptedOutpost) -> None:
    quotas = {"small": {"max": 4, "current": 1}}
    outpost.answers = {"GET /flavors/": (200, quotas), "POST /userflavors": (200, ["small"])}
    flavors = OutpostTarget(url=f"{outpost.url}/flavors/", headers=AUTH)
    assert await api.flavors(flavors, None, time_left=5) == quotas
    assert outpost.last().method == "GET" and outpost.last().body is None
    user = OutpostTarget(url=f"{outpost.url}/userflavors", headers=AUTH)
    with pytest.raises(MalformedAnswer) as raised:
        await api.flavors(user, {"name": "ann"}, time_left=5)
    assert (outpost.last().method, outpost.last().body) == ("POST", {"name": "ann"})
    assert raised.value.public == "the Outpost's flavors are not a JSON object: list"
    assert isinstance(raised.value, OutpostAnswerError)  # final: the pipeline does not retry it


# -- the Outpost refuses the bridge's TLS client certificate ------------------------------


@dataclass
class Pki:
    ca: Path  # signed the server's and the good client's certificates
    server: tuple[Path, Path]
    good_client: tuple[Path, Path]
    stranger: tuple[Path, Path]  # a client certificate from a CA the server does not know

    @property
    def listed(self) -> list[str]:
        return [str(p) for p in (self.ca, *self.good_client, *self.stranger)]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca_key, other_key, *keys = (ec.generate_private_key(ec.SECP256R1()) for _ in range(5))
    ca = _certificate("test CA", ca_key, None, ca_key)
    other = _certificate("other CA", other_key, None, other_key)
    encoded = serialization.Encoding.PEM

    def pair(name: str, key: Any, issuer: Any, issuer_key: Any) -> tuple[Path, Path]:
        cert = _certificate(name, key, issuer, issuer_key)
        private = key.private_bytes(encoded, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        return _pem(tmp_path / f"{name}.pem", cert.public_bytes(encoded)), _pem(tmp_path / f"{name}.key", private)

    return Pki(
        ca=_pem(tmp_path / "ca.pem", ca.public_bytes(encoded)),
        server=pair("outpost", keys[0], ca, ca_key),
        good_client=pair("bridge", keys[1], ca, ca_key),
        stranger=pair("stranger", keys[2], other, other_key),
    )


class MutualTlsOutpost:
    """An HTTPS server in a thread that requires a client certificate signed by its CA.

    Blocking ``ssl`` on purpose: OpenSSL writes its alert before the handshake fails (an
    asyncio server drops the connection without it). After a refused handshake it reads
    until the client closes, so a TLS 1.3 alert (sent after the client's handshake is done)
    is not lost to a reset. Counts the connections it accepted."""

    def __init__(self, pki: Pki, version: ssl.TLSVersion) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
        self.context.load_cert_chain(*pki.server)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.minimum_version = self.context.maximum_version = version
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.url = f"https://127.0.0.1:{self._listener.getsockname()[1]}"
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="mutual TLS outpost", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        self._thread.join(5)
        self._listener.close()

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.settimeout(5)
            try:
                self._answer(conn)
            except OSError:
                pass

    def _answer(self, conn: socket.socket) -> None:
        tls = self.context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        try:
            tls.do_handshake()
        except ssl.SSLError:
            # The alert is out; read until the client closes (closing with its request unread
            # would reset the connection, which may overtake the alert).
            with socket.socket(fileno=tls.detach()) as raw:
                while raw.recv(65536):
                    pass
            return
        with tls:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = tls.recv(65536)
                if not chunk:
                    return
                request += chunk
            body = b'{"status": null}'
            head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            tls.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)


@pytest.fixture(params=[ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["TLS 1.2", "TLS 1.3"])
def mutual_tls(request: pytest.FixtureRequest, pki: Pki) -> Iterator[MutualTlsOutpost]:
    server = MutualTlsOutpost(pki, request.param)
    yield server
    server.close()


@pytest_asyncio.fixture(loop_scope="session")
async def guarded(pki: Pki) -> AsyncIterator[GuardedOutpostClient]:
    breaker = CircuitBreaker(threshold=1, cooldown=Backoff(initial=60, maximum=60, jitter=0))
    client = GuardedOutpostClient(breaker, access=OutpostAccess(["https://127.0.0.1:*"], tls_files=pki.listed))
    await client.start()
    yield client
    await client.close()


def tls_options(pki: Pki, client_cert: tuple[Path, Path]) -> HttpOptions:
    return HttpOptions(ca_certs=str(pki.ca), client_cert=str(client_cert[0]), client_key=str(client_cert[1]))


@aio
async def test_a_refused_client_certificate_is_a_final_error(
    guarded: GuardedOutpostClient, mutual_tls: MutualTlsOutpost, pki: Pki
) -> None:
    api = OutpostApi(guarded)
    services = OutpostTarget(url=f"{mutual_tls.url}/services", http=tls_options(pki, pki.good_client))
    assert await api.status(services, "ann", "s1", time_left=5) == Status()  # the setup works
    refused = OutpostTarget(url=services.url, http=tls_options(pki, pki.stranger))
    with pytest.raises(RequestSettingsError) as raised:
        await api.status(refused, "ann", "s1", time_left=5)
    assert raised.value.public == "the Outpost refused the bridge's TLS client certificate"
    # One hub's certificate says nothing about the Outpost: with threshold 1, a counted
    # failure would have opened the circuit.
    assert guarded.breaker.state(url_origin(services.url)) == "closed"


@aio
async def test_a_refused_client_certificate_is_not_retried(
    guarded: GuardedOutpostClient, mutual_tls: MutualTlsOutpost, pki: Pki, tmp_path: Path
) -> None:
    pipeline = Pipeline(guarded, StartJournal(tmp_path / "j.sqlite"), backoff=Backoff(initial=0.05, maximum=0.2))
    # A start: aiohttp itself sends an idempotent request (a poll's GET) a second time when
    # the connection fails after it was sent (TLS 1.3), never a POST.
    body = StartCommand(
        target=OutpostTarget(url=f"{mutual_tls.url}/services", http=tls_options(pki, pki.stranger)), name="ann"
    )
    command = Envelope(
        id=new_id(), hub="hub", server=ServerRef(user="ann", start_id="s1"), deadline=time.time() + 20, body=body
    )

    async def emit(event: ProgressEvent) -> None:
        pass

    began = time.monotonic()
    answer = await pipeline.run(command, redelivered=False, emit=emit)
    assert time.monotonic() - began < 5  # not retried until the 20 s deadline
    result = answer.body
    assert isinstance(result, CommandResult) and not result.ok and result.error is not None
    assert result.error.kind == "invalid" and not result.error.retryable
    assert "refused the bridge's TLS client certificate" in result.error.summary
    assert mutual_tls.connections == 1  # one POST, no retries
