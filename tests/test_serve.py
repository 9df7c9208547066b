"""`vitpipe serve`: the JSON API answers text, image and key queries with keys, scores, captions and
labels; bad uploads are one-line 4xx answers; the page works in Chromium at phone and desktop width."""

from __future__ import annotations

import io
import socket
import threading
import time

import pytest
from PIL import Image

import test_clip
from test_report_demo import CHROMIUM, VIEWPORTS
from test_trainer import RUN_ARGS
from vitpipe.cli import main
from vitpipe.downstream.features import EncoderSource

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from vitpipe.serve.app import MAX_UPLOAD, create_app  # noqa: E402
from vitpipe.serve.index import SearchIndex  # noqa: E402

caption_shards = test_clip.caption_shards  # coloured squares titled by their file names (a fixture)


@pytest.fixture
def clip_index(caption_shards, tmp_path):
    run = tmp_path / "clip"
    assert main(["pretrain", "clip", "--data", str(caption_shards / "train"), "--out", str(run), *test_clip.ARGS,
                 "train.max_steps=2"]) == 0
    return SearchIndex(EncoderSource.resolve(run), str(caption_shards / "val"), workers=0)


def png_of(data: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


def test_the_api_answers_text_image_and_key_queries(clip_index):
    client = TestClient(create_app(clip_index))
    hits = client.get("/api/search", params={"text": "red square", "k": 5}).json()["results"]
    assert len(hits) == 5 and {"key", "score", "caption", "label", "image"} <= set(hits[0])
    assert all(h["caption"] and h["label"] is not None for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    key = hits[2]["key"]
    by_key = client.get("/api/search", params={"key": key, "k": 3}).json()["results"]
    assert by_key[0]["key"] == key and by_key[0]["score"] == pytest.approx(1.0, abs=1e-4)
    stored = client.get(f"/image/{key}")
    assert stored.status_code == 200 and stored.headers["content-type"].startswith("image/")
    upload = client.post("/api/search", params={"k": 3}, files={"image": ("q.png", png_of(stored.content), "image/png")})
    assert upload.status_code == 200 and upload.json()["results"][0]["key"] == key


def test_bad_requests_are_one_line_4xx(clip_index):
    client = TestClient(create_app(clip_index))
    cases = [
        (client.post("/api/search", files={"image": ("notes.txt", b"not an image at all", "text/plain")}), 400, "not an image"),
        (client.post("/api/search", files={"image": ("big.png", b"\0" * (MAX_UPLOAD + 10), "image/png")}), 413, "larger than"),
        (client.post("/api/search", data={"other": "x"}), 400, "named image"),
        # what `curl --data-binary @photo.png` sends: a url-encoded body, once parsed as 6 fields
        (client.post("/api/search", content=b"a=1&b=2&c=3&d=4&e=5&f=6",
                     headers={"content-type": "application/x-www-form-urlencoded"}), 400, "named image"),
        (client.get("/api/search", params={"text": "x", "k": 0}), 400, "k must be"),
        (client.get("/api/search"), 400, "give one of"),
        (client.get("/api/search", params={"text": "   "}), 400, "empty text"),
        (client.get("/api/search", params={"key": "no-such-key"}), 404, "no indexed image"),
        (client.get("/image/no-such-key"), 404, "no indexed image"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, (response.status_code, response.text)
        message = response.json()["error"]
        assert words in message and "\n" not in message


def test_text_search_needs_an_image_text_run(labelled_shards, tmp_path):
    run = tmp_path / "mae"
    assert main(["pretrain", "mae", "--data", str(labelled_shards / "train"), "--out", str(run), *RUN_ARGS,
                 "train.max_steps=1"]) == 0
    index = SearchIndex(EncoderSource.resolve(run), str(labelled_shards / "val"), workers=0)
    client = TestClient(create_app(index))
    refused = client.get("/api/search", params={"text": "a cat"})
    assert refused.status_code == 400 and "image-text run" in refused.json()["error"]
    key = index.keys[0]
    assert client.get("/api/search", params={"key": key}).json()["results"][0]["key"] == key
    assert "describe an image" not in client.get("/").text  # no text box without a text tower
    again = SearchIndex(EncoderSource.resolve(run), str(labelled_shards / "val"), workers=0)  # from its cache
    assert again.keys == index.keys and (again.vectors == index.vectors).all()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (scripts/setup.sh installs it)")
def test_the_page_searches_and_clicks_through_in_chromium(clip_index, tmp_path):
    import uvicorn

    playwright = pytest.importorskip("playwright.sync_api")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(clip_index), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    errors: list[str] = []
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            for name, viewport in VIEWPORTS.items():
                page = browser.new_page(viewport=viewport)
                page.on("pageerror", lambda err: errors.append(str(err)))
                page.goto(f"http://127.0.0.1:{port}/")
                page.fill("#text", "blue square")
                page.click("button[type=submit]")
                page.wait_for_selector(".hit img")
                page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
                first = page.inner_text(".hit >> nth=1")
                page.click(".hit >> nth=1")  # search from that image: it comes first
                page.wait_for_function(f"document.querySelector('.hit div').textContent.startsWith({first.split(' ')[0]!r})")
                assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 1
                page.screenshot(path=str(tmp_path / f"serve-{name}.png"), full_page=True)
                page.close()
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not errors, errors


def test_serve_refuses_a_missing_run_in_one_line(caption_shards, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nowhere"), "--index", str(caption_shards / "val")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0]
