"""img2dataset's Downloader with vitpipe's bounded fetch (imported only when URLs are ingested).

It lives in its own module because img2dataset pickles the downloader into spawned worker
processes, which import this module by name.
"""

from __future__ import annotations

import functools

from img2dataset import downloader as i2d_downloader

from vitpipe.pipeline.fetch import FetchPolicy, fetch_with_retry


class BoundedDownloader(i2d_downloader.Downloader):
    def __init__(self, *args, policy: FetchPolicy, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.policy = policy

    def download_shard(self, row):
        # runs inside img2dataset's worker process, where the module global is looked up
        i2d_downloader.download_image_with_retry = functools.partial(
            fetch_with_retry, policy=self.policy)
        return super().download_shard(row)
