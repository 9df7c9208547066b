"""Hostile servers against the bounded fetch and `vitpipe ingest` (issue: faults and hostile input).

Every server here listens on 127.0.0.1; redirects to internal addresses are refused before any
connection is made, so no traffic leaves the loopback interface.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time

import pytest

from conftest import encode_image, make_image
from vitpipe.cli import main
from vitpipe.pipeline.fetch import FetchError, FetchPolicy, bounded_fetch

LOOPBACK = ("127.0.0.1/32",)


class HostileHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        body = encode_image(make_image(7))
        if self.path == "/drip-body":  # honest Content-Length, then one byte a second
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for byte in body[:60]:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(1.0)
        elif self.path == "/drip-headers":  # headers that never end
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for _ in range(60):
                self.wfile.write(b"X-Slow: a\r\n")
                self.wfile.flush()
                time.sleep(1.0)
        elif self.path.startswith("/redirect-to/"):
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/redirect-to/"))
            self.end_headers()
        elif self.path == "/ok.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


@pytest.fixture(scope="module")
def hostile():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HostileHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def reason_of(url: str, policy: FetchPolicy) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(FetchError) as caught:
        bounded_fetch(url, policy)
    return str(caught.value).split(":", 1)[0], time.monotonic() - start


@pytest.mark.parametrize("route", ["/drip-body", "/drip-headers"])
def test_timeout_bounds_the_whole_fetch(hostile, route):
    reason, seconds = reason_of(f"http://127.0.0.1:{hostile}{route}", FetchPolicy(3, 10**6, allow_networks=LOOPBACK))
    assert reason == "timeout" and seconds < 4.0


def test_loopback_is_refused_unless_allowed(hostile):
    url = f"http://127.0.0.1:{hostile}/ok.png"
    assert reason_of(url, FetchPolicy(3, 10**6))[0] == "blocked_address"
    assert reason_of(f"http://localhost:{hostile}/ok.png", FetchPolicy(3, 10**6))[0] == "blocked_address"
    assert bounded_fetch(url, FetchPolicy(3, 10**6, allow_networks=LOOPBACK)).startswith(b"\x89PNG")


@pytest.mark.parametrize("target", [
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata (link-local)
    "http://10.0.0.1/x.png", "http://192.168.1.1/x.png", "http://[::1]/x.png",
    "http://127.0.0.2/x.png",  # loopback, but outside the allowed 127.0.0.1/32
    "http://0.0.0.0/x.png", "http://224.0.0.1/x.png",
])
def test_redirect_from_allowed_host_to_internal_address_is_refused(hostile, target):
    reason, _ = reason_of(f"http://127.0.0.1:{hostile}/redirect-to/{target}", FetchPolicy(3, 10**6, allow_networks=LOOPBACK))
    assert reason == "blocked_address"


def test_redirect_checks_scheme(hostile):
    reason, _ = reason_of(f"http://127.0.0.1:{hostile}/redirect-to/file:///etc/passwd",
                          FetchPolicy(3, 10**6, allow_networks=LOOPBACK))
    assert reason == "bad_redirect"


def test_connection_goes_to_the_checked_address(hostile, monkeypatch):
    """A DNS answer that changes between check and connect (rebinding) is never looked up twice."""
    calls = []
    real = socket.getaddrinfo

    def rebinding(host, *args, **kwargs):
        calls.append(host)
        if host == "rebind.test":
            answer = "127.0.0.1" if len(calls) == 1 else "10.0.0.1"
            return real(answer, *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    body = bounded_fetch(f"http://rebind.test:{hostile}/ok.png", FetchPolicy(3, 10**6, allow_networks=LOOPBACK))
    assert body.startswith(b"\x89PNG") and calls == ["rebind.test"]


def test_ingest_classifies_hostile_rows_within_its_timeout(tmp_path, hostile):
    base = f"http://127.0.0.1:{hostile}"
    urls = tmp_path / "urls.txt"
    urls.write_text("\n".join([f"{base}/ok.png", f"{base}/drip-body", f"{base}/drip-headers",
                               f"{base}/redirect-to/http://169.254.169.254/latest/meta-data/",
                               f"{base}/redirect-to/http://127.0.0.2:{hostile}/ok.png"]) + "\n")
    start = time.monotonic()
    code = main(["ingest", str(urls), "--out", str(tmp_path / "out"), "timeout=3", "allow_networks=127.0.0.1/32",
                 "--threads", "8"])
    assert code == 0 and time.monotonic() - start < 40  # img2dataset's own start-up is most of it
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["written"] == 1
    assert manifest["failures"] == {"timeout": 2, "blocked_address": 2}


def test_ingest_refuses_loopback_by_default(tmp_path, hostile):
    urls = tmp_path / "urls.txt"
    urls.write_text(f"http://127.0.0.1:{hostile}/ok.png\n")
    assert main(["ingest", str(urls), "--out", str(tmp_path / "out")]) == 1  # nothing written is a failure
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["written"] == 0 and manifest["failures"] == {"blocked_address": 1}


def test_bad_allow_networks_is_a_usage_error(tmp_path, capsys):
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1/x.png\n")
    assert main(["ingest", str(urls), "--out", str(tmp_path / "out"), "allow_networks=localhost"]) == 2
    assert "allow_networks" in capsys.readouterr().err
