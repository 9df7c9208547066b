"""`vitpipe serve RUN --index SHARDS`: a small web app over a run's search index (FastAPI).

    GET  /                                the search page (text for CLIP runs, drop an image, click a hit)
    GET  /api/search?text=QUERY&k=N       images nearest a caption (image-text runs)
    GET  /api/search?key=KEY&k=N          images nearest an indexed image
    POST /api/search?k=N                  multipart ``image``: images nearest an upload
    GET  /image/KEY                       an indexed image's bytes, as stored

Every search answers {"results": [{"key", "score", "caption", "label", "image"}]}; a bad request is
a 4xx with {"error": one line}. Uploads are bounded (MAX_UPLOAD bytes).
"""

from __future__ import annotations

from pathlib import Path

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from vitpipe.config import ConfigError
from vitpipe.serve.index import SearchIndex

MAX_UPLOAD = 10 * 1024 * 1024
MAX_K = 100
PAGE = jinja2.Template((Path(__file__).parent / "page.html").read_text(), autoescape=True)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(index: SearchIndex) -> FastAPI:
    app = FastAPI(title="vitpipe serve", docs_url=None, redoc_url=None)

    def bounded(k: int) -> int:
        if not 1 <= k <= MAX_K:
            raise ConfigError(f"k must be in 1..{MAX_K}")
        return k

    @app.exception_handler(ConfigError)
    async def refused(request: Request, err: ConfigError) -> JSONResponse:
        return error(400, str(err))

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.render(run=index.source.run.name, objective=index.source.config.objective, size=len(index.keys),
                           text=index.image_text, shards=index.spec)

    @app.get("/api/search")
    def search(text: str | None = None, key: str | None = None, k: int = 12):
        if (text is None) == (key is None):
            return error(400, "give one of text=QUERY or key=KEY (or POST an image)")
        if key is not None:
            try:
                return {"results": index.by_key(key, bounded(k))}
            except KeyError:
                return error(404, f"no indexed image with key {key!r}")
        return {"results": index.by_text(text, bounded(k))}

    @app.post("/api/search")
    async def search_image(request: Request, k: int = 12):
        length = int(request.headers.get("content-length") or 0)
        if length > MAX_UPLOAD:
            return error(413, f"upload larger than {MAX_UPLOAD // (1024 * 1024)} MiB")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            # a raw or url-encoded body would be parsed as form fields ("Too many fields")
            return error(400, "POST a multipart form with one file field named image")
        form = await request.form(max_files=1, max_fields=4)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            return error(400, "POST a multipart form with one file field named image")
        data = await upload.read(MAX_UPLOAD + 1)
        if len(data) > MAX_UPLOAD:
            return error(413, f"upload larger than {MAX_UPLOAD // (1024 * 1024)} MiB")
        return {"results": index.by_image(data, bounded(k))}

    @app.get("/image/{key:path}")
    def image(key: str) -> Response:
        if key not in index.entries:
            return error(404, f"no indexed image with key {key!r}")
        data, mime = index.image(key)
        return Response(data, media_type=mime, headers={"Cache-Control": "max-age=3600"})

    return app


def serve(run: Path, shards: str, host: str = "127.0.0.1", port: int = 8000, workers: int = 2) -> None:
    import uvicorn

    from vitpipe.downstream.features import EncoderSource

    index = SearchIndex(EncoderSource.resolve(run, "trained"), shards, workers)
    print(f"serving {len(index.keys)} images of {shards} on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(index), host=host, port=port, log_level="warning")
