"""One bounded, SSRF-safe HTTP(S) fetch, used inside img2dataset's download workers.

urllib's ``timeout`` bounds each socket operation, not the fetch: a server that drips one byte a
second never trips it. Here a watchdog timer shuts the socket down at the deadline, so connect,
headers and body together never take longer than ``timeout`` (plus the DNS lookup).

Addresses are checked after DNS resolution, and the connection goes to the address that was
checked (no second lookup a rebinding DNS server could answer differently). Redirects are
followed by hand, so every hop gets the same scheme and address checks.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

USER_AGENT = "vitpipe/0.1 (+img2dataset)"
MAX_REDIRECTS = 5
FATAL_REASONS = ("bad_scheme", "too_large", "bad_redirect", "blocked_address")
"""Failures that a retry cannot change."""


@dataclass(frozen=True)
class FetchPolicy:
    timeout: float
    """Seconds for the whole fetch: every connect, header and body byte of every hop."""
    max_bytes: int
    allowed_schemes: tuple[str, ...] = ("http", "https")
    allow_networks: tuple[str, ...] = ()
    """CIDRs let through although they are loopback/private/reserved (e.g. 127.0.0.1/32)."""


class FetchError(Exception):
    """A classified failure; the message starts with the reason (``timeout: ...``)."""


def _blocked(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (address.is_loopback or address.is_private or address.is_link_local or address.is_multicast
            or address.is_reserved or address.is_unspecified
            or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local))


def checked_address(host: str, port: int, allow_networks: tuple[str, ...]) -> tuple[str, int, int]:
    """Resolve ``host`` and return (family, address) of the first resolved address that may be
    fetched. Any resolved address outside the public internet (and the allowed networks) refuses
    the host: a name resolving to both a public and an internal address is not fetched."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise FetchError(f"connection_error: cannot resolve {host!r}: {err}") from None
    allowed = [ipaddress.ip_network(cidr, strict=False) for cidr in allow_networks]
    chosen = None
    for family, _, _, _, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        if _blocked(address) and not any(address in network for network in allowed):
            raise FetchError(f"blocked_address: {host} resolves to {address}, a non-public address "
                             "(allow it with allow_networks)")
        chosen = chosen or (family, sockaddr[0], port)
    if chosen is None:
        raise FetchError(f"connection_error: no address for {host!r}")
    return chosen


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an address checked beforehand, whatever the Host header says."""

    def __init__(self, host: str, address: tuple[int, str, int], timeout: float) -> None:
        super().__init__(host, address[2], timeout=timeout)
        self.pinned = address

    def connect(self) -> None:
        family, ip, port = self.pinned
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect((ip, port))


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    def __init__(self, host: str, address: tuple[int, str, int], timeout: float) -> None:
        super().__init__(host, address, timeout)
        self.context = ssl.create_default_context()

    def connect(self) -> None:
        super().connect()
        self.sock = self.context.wrap_socket(self.sock, server_hostname=self.host)


class _Watchdog:
    """Shuts the current socket down when the deadline passes, whatever call is blocked on it."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.fired = False
        self.connection: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True

    def __enter__(self) -> "_Watchdog":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()

    def watch(self, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            self.connection = connection

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise FetchError("timeout: deadline passed")
        return left

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            sock = self.connection.sock if self.connection is not None else None
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def bounded_fetch(url: str, policy: FetchPolicy) -> bytes:
    """The body of ``url`` after at most MAX_REDIRECTS checked redirects, or a FetchError whose
    message starts with its reason (bad_scheme, blocked_address, bad_redirect, timeout,
    too_large, empty_file, http_4xx/5xx, connection_error, truncated_body)."""
    deadline = time.monotonic() + policy.timeout
    with _Watchdog(deadline) as watchdog:
        try:
            return _follow(url, policy, watchdog)
        except FetchError:
            raise
        except (OSError, http.client.HTTPException) as err:
            if watchdog.fired or time.monotonic() >= deadline:
                raise FetchError(f"timeout: not complete after {policy.timeout}s") from None
            if isinstance(err, http.client.IncompleteRead):
                raise FetchError(f"truncated_body: {err}") from None
            raise FetchError(f"connection_error: {type(err).__name__}: {err}") from None


def _follow(url: str, policy: FetchPolicy, watchdog: _Watchdog) -> bytes:
    for hop in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in policy.allowed_schemes:
            reason = "bad_redirect" if hop else "bad_scheme"
            raise FetchError(f"{reason}: scheme {scheme or 'none'!r} not allowed")
        if not parts.hostname:
            raise FetchError(f"bad_scheme: no host in {url!r}")
        port = parts.port or (443 if scheme == "https" else 80)
        address = checked_address(parts.hostname, port, policy.allow_networks)
        kind = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
        connection = kind(parts.hostname, address, timeout=watchdog.remaining())
        watchdog.watch(connection)
        try:
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request("GET", path, headers={"User-Agent": USER_AGENT, "Accept": "*/*",
                                                     "Connection": "close"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise FetchError(f"bad_redirect: {response.status} without Location")
                url = urljoin(url, location)
                continue
            if response.status >= 400:
                raise FetchError(f"http_{response.status // 100}xx: HTTP Error {response.status}")
            return _read_body(response, policy, watchdog)
        finally:
            connection.close()
    raise FetchError(f"bad_redirect: more than {MAX_REDIRECTS} redirects")


def _read_body(response: http.client.HTTPResponse, policy: FetchPolicy, watchdog: _Watchdog) -> bytes:
    declared = response.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > policy.max_bytes:
        raise FetchError(f"too_large: Content-Length {declared} > {policy.max_bytes}")
    chunks, size = [], 0
    while True:
        watchdog.remaining()
        chunk = response.read1(64 * 1024)
        if not chunk:
            break
        size += len(chunk)
        if size > policy.max_bytes:
            raise FetchError(f"too_large: body exceeds {policy.max_bytes} bytes")
        chunks.append(chunk)
    if watchdog.fired:
        raise FetchError(f"timeout: not complete after {policy.timeout}s")
    if declared and declared.isdigit() and size < int(declared):
        raise FetchError(f"truncated_body: {size} of {declared} bytes")
    if not size:
        raise FetchError("empty_file: zero-byte body")
    return b"".join(chunks)


def fetch_with_retry(row, timeout, retries, user_agent_token, disallowed_header_directives, *,
                     policy: FetchPolicy):
    """Drop-in for img2dataset.downloader.download_image_with_retry (same signature and result);
    img2dataset's own ``timeout`` is ignored in favour of ``policy.timeout`` (the same setting)."""
    import io

    key, url = row
    error = None
    for _ in range(retries + 1):
        try:
            return key, io.BytesIO(bounded_fetch(url, policy)), None
        except FetchError as err:
            error = str(err)
            if error.startswith(FATAL_REASONS):
                break
        except Exception as err:  # anything unexpected is still a classified row, never a crash
            error = f"other_error: {type(err).__name__}: {err}"
    return key, None, error
