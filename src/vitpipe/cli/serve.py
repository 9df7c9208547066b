"""`vitpipe serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitpipe.cli.common import user_errors


@user_errors
def serve(
    run: Annotated[Path, typer.Argument(help="Run directory (a CLIP run also answers text queries).")],
    index: Annotated[str, typer.Option("--index", help="Local shards to search (directory, glob or brace pattern).")],
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    host: Annotated[str, typer.Option(help="Address to bind (127.0.0.1: this machine only).")] = "127.0.0.1",
    workers: Annotated[int, typer.Option("--workers", help="DataLoader workers while embedding the index.")] = 2,
) -> None:
    """A search page and JSON API over the run's embeddings of --index: text (CLIP runs), an
    uploaded image, or a click on a result; GET/POST /api/search answer JSON."""
    from vitpipe.serve.app import serve as run_server

    run_server(run, index, host, port, workers)
