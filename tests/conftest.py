"""Shared fixtures: a loopback image server that injects failures, tiny shard sets written on the fly."""

from __future__ import annotations

import http.server
import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: a worker per CPU this process may use, at most 4 (the multi-process tests
    start 2 processes each; more workers only queue them)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def pytest_configure(config) -> None:
    """Under several workers, one thread each (and each CLI run a test starts inherits it):
    2 workers x torch's default threads oversubscribe 2 cores, and OpenMP spins on a
    descheduled thread."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def make_image(index: int, size: int = 24, mode: str = "RGB") -> Image.Image:
    """A distinct, deterministic image per index (so exact-duplicate removal has nothing to remove)."""
    rng = np.random.default_rng(index)
    array = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    image = Image.fromarray(array, "RGB")
    return image if mode == "RGB" else image.convert(mode)


def encode_image(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


class ImageHandler(http.server.BaseHTTPRequestHandler):
    """Routes: /img/N.png|jpg, /cmyk.jpg, /gray.png, /rgba.png, /404, /500, /slow, /to-file,
    /not-image, /truncated.jpg, /bomb.png, /empty, /big, /redirect/N.png."""

    big_bytes = 3_000_000

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(self, body: bytes, content_type: str = "image/png", status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        path = self.path.split("?")[0]
        if path.startswith("/img/"):
            name = path.rsplit("/", 1)[1]
            index, _, ext = name.partition(".")
            fmt = {"png": "PNG", "jpg": "JPEG"}[ext]
            self._send(encode_image(make_image(int(index)), fmt), f"image/{ext}")
        elif path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", "/img/" + path.rsplit("/", 1)[1])
            self.end_headers()
        elif path == "/cmyk.jpg":
            self._send(encode_image(make_image(1001, mode="CMYK"), "JPEG"), "image/jpeg")
        elif path == "/gray.png":
            self._send(encode_image(make_image(1002, mode="L")))
        elif path == "/rgba.png":
            self._send(encode_image(make_image(1003, mode="RGBA")))
        elif path == "/404":
            self._send(b"missing", "text/plain", 404)
        elif path == "/500":
            self._send(b"boom", "text/plain", 500)
        elif path == "/slow":
            body = encode_image(make_image(1004))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for byte in body[:20]:  # drip: each read succeeds, the whole never arrives in time
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.25)
        elif path == "/to-file":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
        elif path == "/not-image":
            self._send(b"<html>hello</html>", "text/html")
        elif path == "/truncated.jpg":
            self._send(encode_image(make_image(1005, size=64), "JPEG")[:300], "image/jpeg")
        elif path == "/bomb.png":
            self._send(encode_image(Image.new("L", (3000, 3000))))
        elif path == "/empty":
            self._send(b"", "image/png")
        elif path == "/big":
            self._send(b"\0" * self.big_bytes, "image/png")
        else:
            self._send(b"no route", "text/plain", 404)


@pytest.fixture(scope="session")
def image_server():
    """Base URL of a threaded HTTP server on 127.0.0.1 (loopback only)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def write_image_folder(root: Path, per_class: int = 3, classes=("cat", "dog")) -> Path:
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(label * 100 + i).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def tiny_shards(tmp_path):
    """A labelled shard set (5 uneven shards, 23 samples) written through the real ingest."""
    from vitpipe.config import IngestConfig
    from vitpipe.pipeline.ingest import ingest

    folder = write_image_folder(tmp_path / "images", per_class=23, classes=("a",))
    # sizes 5,5,5,5,3
    ingest(str(folder), tmp_path / "shards", IngestConfig(shard_size=5), progress=False)
    return tmp_path / "shards"


@pytest.fixture
def labelled_shards(tmp_path):
    from vitpipe.config import IngestConfig
    from vitpipe.pipeline.ingest import ingest

    folder = write_image_folder(tmp_path / "imgs", per_class=16, classes=("a", "b"))
    ingest(str(folder), tmp_path / "shards", IngestConfig(shard_size=10, val_fraction=0.25, image_size=16),
           progress=False)
    return tmp_path / "shards"


FAILURE_ROUTES = {
    "/404": "http_4xx", "/500": "http_5xx", "/slow": "timeout", "/to-file": "bad_redirect",
    "/not-image": "not_an_image", "/truncated.jpg": "not_an_image", "/bomb.png": "too_many_pixels",
    "/empty": "empty_file", "/big": "too_large",
}


@pytest.fixture
def url_list(tmp_path, image_server):
    good = [f"/img/{i}.png" for i in range(12)] + ["/img/12.jpg", "/redirect/13.png", "/cmyk.jpg", "/gray.png",
                                                    "/rgba.png"]
    rows = [("url", "caption")]
    rows += [(image_server + p, f"a photo number {i}") for i, p in enumerate(good)]
    rows += [(image_server + "/img/3.png", "duplicate of three")]
    rows += [(image_server + p, "bad") for p in FAILURE_ROUTES]
    rows += [("file:///etc/passwd", "local file"), ("ftp://127.0.0.1/x.png", "ftp")]
    path = tmp_path / "urls.csv"
    path.write_text("\n".join(",".join(r) for r in rows) + "\n")
    return path
