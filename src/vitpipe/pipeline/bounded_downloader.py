"""img2dataset's Downloader with vitpipe's bounded fetch (imported only when URLs are ingested).

It lives in its own module because img2dataset pickles the downloader into spawned worker
processes (or Spark executors), which import this module by name.
"""

from __future__ import annotations

import functools

from img2dataset import downloader as i2d_downloader
from PIL import Image

from vitpipe.pipeline.fetch import FetchPolicy, fetch_with_retry


class PixelBound:
    """img2dataset's resizer behind a header check: an image whose header claims more than
    ``max_pixels`` is refused before OpenCV decodes it (img2dataset checks the area only after
    decoding, and OpenCV's own bound is an environment variable read once at import, which a
    Spark executor's Python worker never sees)."""

    def __init__(self, resizer, max_pixels: int) -> None:
        self.resizer, self.max_pixels = resizer, max_pixels

    def __call__(self, img_stream, *args, **kwargs):
        try:
            width, height = Image.open(img_stream).size  # reads the header only
        except Exception:  # a format PIL does not know: OpenCV decides, as before
            width = height = 0
        img_stream.seek(0)
        if width * height > self.max_pixels:
            return None, None, None, None, None, "image area too large"
        return self.resizer(img_stream, *args, **kwargs)


class BoundedDownloader(i2d_downloader.Downloader):
    def __init__(self, *args, policy: FetchPolicy, max_pixels: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.policy = policy
        self.resizer = PixelBound(self.resizer, max_pixels)

    def download_shard(self, row):
        # runs inside img2dataset's worker process, where the module global is looked up
        i2d_downloader.download_image_with_retry = functools.partial(
            fetch_with_retry, policy=self.policy)
        return super().download_shard(row)
