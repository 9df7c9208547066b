"""img2dataset's Downloader with vitpipe's bounded fetch (imported only when URLs are ingested).

It lives in its own module because img2dataset pickles the downloader into spawned worker
processes, which import this module by name.
"""

from __future__ import annotations

import functools

from img2dataset import downloader as i2d_downloader

from vitpipe.pipeline.web import fetch_with_retry


class BoundedDownloader(i2d_downloader.Downloader):
    def __init__(self, *args, max_bytes: int, allowed: tuple[str, ...], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_bytes = max_bytes
        self.allowed = allowed

    def download_shard(self, row):
        # runs inside img2dataset's worker process, where the module global is looked up
        i2d_downloader.download_image_with_retry = functools.partial(
            fetch_with_retry, max_bytes=self.max_bytes, allowed=self.allowed)
        return super().download_shard(row)
