"""The search index `vitpipe serve` answers from: every image of a shard set embedded by a run (a
CLIP run's joint image embedding, so text finds images; any other run's pooled encoder output),
in a faiss inner-product index, with each key's caption, label and where its image bytes are.

The embeddings are kept in RUN/eval/serve/<id>.npz (named by the weights and the shards), so a
restart does not embed again.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vitpipe.runlayout import RunLayout
from vitpipe.config import ConfigError
from vitpipe.downstream.features import EncoderSource
from vitpipe.pipeline.census import parse_label, sample_members
from vitpipe.pipeline.images import EXTENSIONS, ImageRejected, decode_rgb
from vitpipe.pipeline.loader import eval_loader
from vitpipe.pipeline.shardset import open_shard, resolve_shards
from vitpipe.pipeline.transforms import TransformSpec, build_transform
from vitpipe.ssl import registry

MIME = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
MAX_QUERY_PIXELS = 40_000_000


@dataclass
class Entry:
    key: str
    caption: str | None
    label: int | None
    url: str
    offset: int
    size: int
    ext: str


class SearchIndex:
    """Nearest images of a text, an uploaded image or an indexed key."""

    def __init__(self, source: EncoderSource, spec: str, workers: int = 2) -> None:
        self.source, self.spec = source, spec
        self.image_text = registry.get(source.config.objective).towers == ("image", "text")
        self.model = self._model()
        self.transform = build_transform(TransformSpec.for_eval(source.config.data))
        self.entries = {entry.key: entry for entry in _entries(spec)}
        keys, vectors = self._embedded(workers)
        self.keys, self.vectors = keys, vectors
        import faiss

        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)
        self.rows = {key: row for row, key in enumerate(keys)}

    def _model(self):
        if self.image_text:
            from vitpipe.downstream.imagetext import load_image_text_model

            return load_image_text_model(self.source).eval()
        encoder = self.source.build()
        if encoder is None:
            raise ConfigError("vitpipe serve needs an encoder; raw pixels are not one")
        return encoder.eval()

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> np.ndarray:
        """[B, C, H, W] normalised pixels -> [B, D] unit vectors."""
        if self.image_text:
            out = self.model.encode_image(images)
        else:
            out = self.model.pool(self.model.forward_features(images), None)
        return torch.nn.functional.normalize(out.float(), dim=-1).numpy()

    def _embedded(self, workers: int) -> tuple[list[str], np.ndarray]:
        ident = hashlib.sha256(json.dumps([self.source.identity(), resolve_shards(self.spec).identity()],
                                          sort_keys=True).encode()).hexdigest()[:24]
        cache = RunLayout.of(self.source.run).eval / "serve" / f"{ident}.npz"
        if cache.is_file():
            with np.load(cache, allow_pickle=False) as stored:
                return [str(k) for k in stored["keys"]], stored["vectors"]
        loader = eval_loader(resolve_shards(self.spec), self.source.config.data, ("image", "key"), workers)
        keys, parts = [], []
        for batch in loader:
            parts.append(self.embed_images(batch["image"]))
            keys.extend(batch["key"])
        if not keys:
            raise ConfigError(f"no readable images in {self.spec}")
        vectors = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
        cache.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, keys=np.array(keys), vectors=vectors)
        from vitpipe.pipeline.manifest import write_bytes_atomic

        write_bytes_atomic(cache, buffer.getvalue())
        return keys, vectors

    def _results(self, query: np.ndarray, k: int) -> list[dict[str, Any]]:
        scores, rows = self.index.search(np.ascontiguousarray(query[None], dtype=np.float32), min(k, len(self.keys)))
        out = []
        for score, row in zip(scores[0].tolist(), rows[0].tolist()):
            entry = self.entries.get(self.keys[row])
            out.append({"key": self.keys[row], "score": round(float(score), 6),
                        "caption": entry.caption if entry else None, "label": entry.label if entry else None,
                        "image": f"/image/{self.keys[row]}"})
        return out

    def by_text(self, text: str, k: int) -> list[dict[str, Any]]:
        if not self.image_text:
            raise ConfigError(f"text search needs an image-text run (clip); this one is {self.source.config.objective}")
        if not text.strip():
            raise ConfigError("empty text query")
        with torch.no_grad():
            vector = self.model.encode_text(self.model.tokenize.encode([text])[0])[0]
        return self._results(torch.nn.functional.normalize(vector.float(), dim=-1).numpy(), k)

    def by_image(self, data: bytes, k: int) -> list[dict[str, Any]]:
        try:
            image = decode_rgb(data, MAX_QUERY_PIXELS)
        except ImageRejected as err:
            raise ConfigError(f"not an image this server can read ({err.reason})") from None
        return self._results(self.embed_images(self.transform(image).unsqueeze(0))[0], k)

    def by_key(self, key: str, k: int) -> list[dict[str, Any]]:
        if key not in self.rows:
            raise KeyError(key)
        return self._results(self.vectors[self.rows[key]], k)

    def image(self, key: str) -> tuple[bytes, str]:
        entry = self.entries[key]
        with open_shard(entry.url) as handle:
            handle.seek(entry.offset)
            return handle.read(entry.size), MIME[entry.ext]


def _entries(spec: str):
    """Every sample's key, caption, label and image location, reading only the small members."""
    for url in resolve_shards(spec).urls:
        with open_shard(url) as handle:
            for members in sample_members(handle, ("txt", "cls")):
                ext = next((e for e in EXTENSIONS if e in members), None)
                key = members.get("__key__")
                if ext is None or key is None:
                    continue
                caption = members["txt"].decode("utf-8", errors="replace") if "txt" in members else None
                try:
                    label = parse_label(members["cls"]) if "cls" in members else None
                except ValueError:
                    label = None
                offset, size = members[ext]
                yield Entry(key, caption, label, url, offset, size, ext)
