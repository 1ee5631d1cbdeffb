"""What a command may make the bridge reach: allowed Outpost URLs (with the bridge's credentials), SSH nodes and files.

:class:`OutpostAccessTraits` holds the settings (mixed into ``OutpostBridge``, so they are
``c.OutpostBridge.*``). From them it builds :class:`OutpostAccess`, which every Outpost call
passes (:class:`~jupyterhub_outpost_mq.bridge.outpost.OutpostClient`: commands, deferred
stops, the reconciler's list and stop calls), and
:class:`~jupyterhub_outpost_mq.bridge.ssh_options.SshAccess`, which every SSH setting passes.

Why the bridge decides and not the message: the broker is a trust boundary (DESIGN.md,
invariants 10 and 11). Whoever can publish a command must not be able to point the bridge at
a URL, a host or a file its administrator did not list, or read a credential the bridge holds.
URLs with userinfo (``http://user:pw@host/``) are refused outright and never shown with it
(:func:`redact_url`): credentials belong in headers or in ``outpost_credentials``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from traitlets import Dict, HasTraits, List, Unicode, default
from yarl import URL

from jupyterhub_outpost_mq.bridge.errors import ConfigurationError, TargetNotAllowed
from jupyterhub_outpost_mq.bridge.ssh_options import SshAccess, parse_node_pattern
from jupyterhub_outpost_mq.schemas import HttpOptions

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger

_PREFIX = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?#]*)(?P<path>/[^?#]*)?")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token
_MAX_SHOWN = 200


def redact_url(url: str) -> str:
    """``url`` fit for logs, events and error texts: ``scheme://host[:port]/path`` without
    userinfo, query or fragment (extends :func:`~jupyterhub_outpost_mq.schemas.topology.url_origin`
    with the path), at most 200 characters."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return "<invalid URL>"
    netloc = f"[{host}]" if ":" in host else host
    text = f"{parts.scheme}://{netloc}{f':{port}' if port else ''}{parts.path}"
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def has_userinfo(url: str) -> bool:
    """Whether ``url`` names a user or password before its host (``http://u:p@host/``)."""
    try:
        return "@" in urlsplit(url).netloc
    except ValueError:
        return False


@dataclass(frozen=True)
class UrlPrefix:
    """One ``scheme://host[:port][/path]`` entry: covers URLs with that scheme, host and port
    (``:*`` = any port) whose path starts with the same whole segments."""

    text: str
    scheme: str
    host: str
    port: int | None  # None: any port
    segments: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> UrlPrefix:
        """Raises :class:`ValueError` saying what is wrong with ``text``."""
        match = _PREFIX.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"{text!r} is not scheme://host[:port][/path] (no query, no fragment)")
        authority = match["authority"]
        if "@" in authority:
            raise ValueError(f"{redact_url(text)!r} must not hold a user name or password")
        raw = [unquote(part) for part in (match["path"] or "").split("/")[1:]]
        if any(part in (".", "..") or "/" in part or "\\" in part for part in raw):
            raise ValueError(f"{text!r} has '.', '..' or an encoded slash in its path")
        any_port = authority.endswith(":*")
        if any_port:
            authority = authority[:-2]
        url = URL(f"{match['scheme']}://{authority}{match['path'] or '/'}")
        if url.scheme not in ("http", "https") or not url.raw_host:
            raise ValueError(f"{text!r} is not an http(s) URL with a host")
        segments = _segments(url) or ()
        port = None if any_port else url.port
        return cls(text=text.strip(), scheme=url.scheme, host=url.raw_host.lower(), port=port, segments=segments)

    def covers(self, url: URL, segments: tuple[str, ...]) -> bool:
        return (
            url.scheme == self.scheme
            and (url.raw_host or "").lower() == self.host
            and (self.port is None or url.port == self.port)
            and segments[: len(self.segments)] == self.segments
        )


def _segments(url: URL) -> tuple[str, ...] | None:
    """The decoded path segments (no trailing empty one); ``None`` when a segment is ``.`` or
    ``..``, or decodes to a slash or backslash (a server or proxy might resolve those, so a
    prefix check on them would mean nothing). yarl has already resolved literal and ``%2e`` dot
    segments, the same way the request will."""
    parts = list(url.parts[1:])
    if parts and parts[-1] == "":
        parts.pop()
    if any(p in (".", "..") or "/" in p or "\\" in p for p in parts):
        return None
    return tuple(parts)


class _Credentials:
    """Headers for one prefix: given in the configuration, or read from a file (``Name: value``
    per line, ``#`` comments, like curl's ``-H @file``) and read again when the file changes
    (a rotated Kubernetes Secret). A file's content is never logged."""

    def __init__(self, prefix: UrlPrefix, source: Mapping[str, str] | str) -> None:
        self.prefix = prefix
        self._path = source if isinstance(source, str) else ""
        self._stamp: tuple[int, int, int] | None = None
        self._headers: dict[str, str] = {} if isinstance(source, str) else _checked(dict(source), prefix.text)
        if self._path:
            try:
                self._read()  # at start-up: an unreadable file is a configuration error
            except (OSError, ValueError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ConfigurationError(
                    f"OutpostBridge.outpost_credentials[{prefix.text!r}]: cannot read {self._path}: {reason}"
                ) from None

    def headers(self) -> dict[str, str]:
        if self._path:
            try:
                self._read()
            except (OSError, ValueError, ConfigurationError) as exc:
                # Keep the last good headers: a half-written file must not cut the Outpost off.
                log.warning("outpost_credentials: keeping the previous headers for %s: %s", self.prefix.text, exc)
        return self._headers

    def _read(self) -> None:
        info = os.stat(self._path)
        stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
        if stamp == self._stamp:
            return
        headers: dict[str, str] = {}
        with open(self._path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                name, sep, value = line.partition(":")
                if not sep:
                    raise ConfigurationError(
                        f"OutpostBridge.outpost_credentials: line {number} of {self._path} is not 'Name: value'"
                    )
                headers[name.strip()] = value.strip()
        self._headers = _checked(headers, self._path)
        self._stamp = stamp


def _checked(headers: dict[str, str], where: str) -> dict[str, str]:
    for name, value in headers.items():
        if not _HEADER_NAME.fullmatch(name) or not isinstance(value, str) or any(c in value for c in "\r\n\0"):
            # Neither name nor value is shown: a mangled line may be the secret itself.
            raise ConfigurationError(f"OutpostBridge.outpost_credentials: {where}: an invalid header name or value")
    return headers


class OutpostAccess:
    """The Outpost URLs the bridge may call and the headers it adds to each call.

    ``OutpostAccess()`` allows nothing. Raises :class:`ConfigurationError` naming the option
    when an entry is invalid.
    """

    def __init__(
        self,
        allowed: Sequence[str] = (),
        credentials: Mapping[str, Mapping[str, str] | str] | None = None,
        tls_files: Sequence[str] = (),
    ) -> None:
        self.prefixes = tuple(_prefix(text, "allowed_outposts") for text in allowed)
        self._credentials: list[_Credentials] = []
        for text, source in (credentials or {}).items():
            prefix = _prefix(text, "outpost_credentials")
            if not any(_overlap(prefix, allowed_prefix) for allowed_prefix in self.prefixes):
                # They would never be sent: most likely a typo in one of the two options.
                raise ConfigurationError(
                    f"OutpostBridge.outpost_credentials: {text!r} covers no URL of OutpostBridge.allowed_outposts"
                )
            if not isinstance(source, (str, Mapping)):
                raise ConfigurationError(
                    f"OutpostBridge.outpost_credentials[{text!r}] must be a dict of headers or a file path"
                )
            self._credentials.append(_Credentials(prefix, source))
        # The longest (most specific) prefix wins; a fixed port before ":*".
        self._credentials.sort(key=lambda c: (len(c.prefix.segments), c.prefix.port is not None), reverse=True)
        self._tls_files = frozenset(tls_files)

    def check(self, url: str, options: HttpOptions | None = None) -> URL:
        """The URL to call (parsed once, so what is checked is what is requested); raises
        :class:`TargetNotAllowed` with a reason fit for the user, before any network call."""
        if has_userinfo(url):
            raise TargetNotAllowed(
                "the Outpost URL holds a user name or password; the bridge refuses such URLs (send credentials"
                " as request_headers, or configure them in c.OutpostBridge.outpost_credentials)"
            )
        try:
            parsed = URL(url)
        except ValueError:
            raise TargetNotAllowed("the Outpost URL is not a valid http(s) URL") from None
        segments = _segments(parsed)
        if parsed.scheme not in ("http", "https") or not parsed.raw_host:
            raise TargetNotAllowed("the Outpost URL is not a valid http(s) URL")
        if segments is None:
            raise TargetNotAllowed("the Outpost URL has '.', '..' or an encoded slash in its path")
        if not self.prefixes:
            raise TargetNotAllowed("this bridge allows no Outpost yet: c.OutpostBridge.allowed_outposts is empty")
        if not any(prefix.covers(parsed, segments) for prefix in self.prefixes):
            raise TargetNotAllowed(
                f"the bridge does not allow calls to {redact_url(url)} (c.OutpostBridge.allowed_outposts)"
            )
        if options is not None:
            self._check_options(options)
        return parsed

    def allows(self, url: str) -> bool:
        try:
            self.check(url)
        except TargetNotAllowed:
            return False
        return True

    def _check_options(self, options: HttpOptions) -> None:
        if options.proxy_host:
            # The proxy would see every request, the bridge's credentials included.
            raise TargetNotAllowed(
                "the bridge does not use an HTTP proxy named in a command (request_kwargs proxy_host)"
            )
        for name in ("ca_certs", "client_cert", "client_key"):
            path = getattr(options, name)
            if path and path not in self._tls_files:
                raise TargetNotAllowed(
                    f"the bridge reads no file named in a command (request_kwargs {name}) unless it is listed in"
                    " c.OutpostBridge.outpost_tls_files"
                )

    def headers(self, url: URL, sent: Mapping[str, str]) -> dict[str, str]:
        """``sent`` (the command's headers) with the bridge's credentials for ``url`` on top:
        a header the bridge holds replaces the command's header of the same name."""
        segments = _segments(url)
        for credentials in self._credentials:
            if segments is not None and credentials.prefix.covers(url, segments):
                own = credentials.headers()
                names = {name.lower() for name in own}
                return {**{k: v for k, v in sent.items() if k.lower() not in names}, **own}
        return dict(sent)


def _prefix(text: str, trait: str) -> UrlPrefix:
    try:
        return UrlPrefix.parse(text)
    except ValueError as exc:
        raise ConfigurationError(f"OutpostBridge.{trait}: {exc}") from None


def _overlap(a: UrlPrefix, b: UrlPrefix) -> bool:
    """Whether some URL is covered by both prefixes."""
    shorter = min(len(a.segments), len(b.segments))
    return (
        a.scheme == b.scheme
        and a.host == b.host
        and (a.port is None or b.port is None or a.port == b.port)
        and a.segments[:shorter] == b.segments[:shorter]
    )


class OutpostAccessTraits(HasTraits):
    """Settings of what commands may make the bridge reach (docs/security.md)."""

    allowed_outposts = List(
        Unicode(),
        help="""URL prefixes (``scheme://host[:port][/path]``) of the Outposts this bridge may
        call. A command whose Outpost URL (or the URL built from it) is under none of them is
        answered at once with a failed result naming this option, and nothing is requested:
        starts, polls, stops, flavors and the reconciler's list and stop calls alike. A prefix
        covers whole path segments (``https://a.org/services`` covers
        ``https://a.org/services/x`` but not ``https://a.org/servicesX``); scheme, host and
        port must match exactly (the default port of the scheme when none is given); ``:*``
        allows any port of that host (meant for development and tests). Userinfo
        (``http://user:pw@...``) is never allowed.

        Empty (the default) allows **no** Outpost: the bridge starts with a warning and
        refuses every Outpost command. Default: the ``OUTPOST_MQ_ALLOWED_OUTPOSTS``
        environment variable (comma-separated). Command line: ``--allowed-outpost=URL``
        (repeat it).

        Example::

            c.OutpostBridge.allowed_outposts = [
                "https://outpost-a.example.org/services",
                "https://outpost-a.example.org/flavors",
                "https://outpost-a.example.org/userflavors",
            ]
        """,
    ).tag(config=True)

    @default("allowed_outposts")
    def _default_allowed_outposts(self) -> list[str]:
        return [u.strip() for u in os.environ.get("OUTPOST_MQ_ALLOWED_OUTPOSTS", "").split(",") if u.strip()]

    outpost_credentials = Dict(
        key_trait=Unicode(),
        help="""HTTP headers the bridge itself adds to its calls to an Outpost, so that hubs
        need to send none (and no credential crosses the broker): URL prefix (as in
        ``allowed_outposts``; it must cover some allowed URL) -> either a dict of headers, or the path
        of a file holding them, one ``Name: value`` per line (``#`` starts a comment; like
        curl's ``-H @file``). A file is read at start-up (an unreadable one stops the bridge)
        and read again whenever it changes (a rotated Kubernetes Secret); its content is never
        logged. When several prefixes cover a URL, the longest one applies. A header the
        bridge holds replaces the command's header of the same name (case-insensitive): the
        bridge's credentials win; other headers of the command are sent as they are.

        Example::

            c.OutpostBridge.outpost_credentials = {
                # the file holds one line: Authorization: Basic anVweXRlcmh1Yjp...
                "https://outpost-a.example.org": "/etc/outpost-bridge/outpost-a.headers",
                "http://outpost-b.internal:8080/services": {"Authorization": "Bearer ..."},
            }
        """,
    ).tag(config=True)
    outpost_tls_files = List(
        Unicode(),
        help="""Files a command's HTTP options (``request_kwargs``: ``ca_certs``,
        ``client_cert``, ``client_key``) may name, exactly as the hub names them. Any other path
        is refused: the bridge reads no file a message chooses. Empty (default): none.

        Example::

            c.OutpostBridge.outpost_tls_files = ["/etc/outpost-bridge/outpost-ca.pem"]
        """,
    ).tag(config=True)

    ssh_keys = Dict(
        value_trait=Unicode(),
        key_trait=Unicode(),
        help="""Private key files the bridge may use for SSH: name -> path on the bridge host.
        A command names a key by its name (``ssh_key``, or the ``IdentityFile`` option); a
        path equal to one listed here is accepted too, so an upstream hub configuration that
        sends paths keeps working once the same paths are listed. Any other value is refused;
        the bridge never reads a key file a message chooses. The key named ``default`` is used
        when a command names none; without it, no key is offered.

        Example::

            c.OutpostBridge.ssh_keys = {"hpc": "/etc/outpost-bridge/ssh/id_ed25519"}
        """,
    ).tag(config=True)
    ssh_known_hosts = Dict(
        value_trait=Unicode(),
        key_trait=Unicode(),
        help="""Known-hosts files a command may choose with the ``UserKnownHostsFile`` option:
        name -> path (a listed path is accepted too). Any other value is refused. Without the
        option the bridge uses ``known_hosts_path``. A listed file must exist (only
        ``known_hosts_path`` is created when missing).

        Example::

            c.OutpostBridge.ssh_known_hosts = {"hpc": "/etc/outpost-bridge/ssh/known_hosts_hpc"}
        """,
    ).tag(config=True)
    ssh_allowed_hosts = List(
        Unicode(),
        help="""SSH nodes the bridge may connect to for forwards and remote forwards:
        ``host`` or ``host:port`` patterns (``[v6]:port`` for IPv6; ``*`` and ``?`` as in
        OpenSSH's ``Host``; no port = any port), matched case-insensitively against the node
        a command names (after its ``Port`` option). Empty (the default): no SSH at all; a
        command with an SSH endpoint fails with a reason naming this option.

        Example::

            c.OutpostBridge.ssh_allowed_hosts = ["hpc-login.example.org:22", "*.nodes.example.org"]
        """,
    ).tag(config=True)

    def outpost_access(self, logger: logging.Logger | logging.LoggerAdapter[Any]) -> OutpostAccess:
        """The Outpost allow-list with the bridge's credentials, or :class:`ConfigurationError`."""
        access = OutpostAccess(
            list(self.allowed_outposts), dict(self.outpost_credentials), list(self.outpost_tls_files)
        )
        if not access.prefixes:
            logger.warning(
                "OutpostBridge.allowed_outposts is empty: every Outpost command will be refused"
                " (list the Outposts' URL prefixes, see docs/security.md)"
            )
        return access

    def ssh_access(self, logger: logging.Logger | logging.LoggerAdapter[Any]) -> SshAccess:
        """The SSH nodes and files commands may use, or :class:`ConfigurationError`."""
        for pattern in self.ssh_allowed_hosts:
            try:
                parse_node_pattern(pattern)
            except ValueError as exc:
                raise ConfigurationError(f"OutpostBridge.ssh_allowed_hosts: {exc}") from None
        for trait in ("ssh_keys", "ssh_known_hosts"):
            for name, path in getattr(self, trait).items():
                if not name or not os.path.isabs(path):
                    raise ConfigurationError(f"OutpostBridge.{trait}: {name!r} must map to an absolute path")
        if not self.ssh_allowed_hosts:
            logger.info("OutpostBridge.ssh_allowed_hosts is empty: commands asking for SSH forwards will be refused")
        return SshAccess(
            keys=dict(self.ssh_keys), known_hosts=dict(self.ssh_known_hosts), hosts=tuple(self.ssh_allowed_hosts)
        )
