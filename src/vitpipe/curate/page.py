"""DIR/curation/index.html: what curate removed and why, for a person to check: the count per
reason and, for the first removals of each reason, the removed image beside the one it repeats
(the kept sample, or the evaluation image it copies). Thumbnails are inlined: the page is one file.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import jinja2

from vitpipe.curate.steps import Item, Removal
from vitpipe.pipeline.fingerprints import sample_image

EXAMPLES_PER_REASON = 12
THUMB_PX = 96

TEMPLATE = jinja2.Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>vitpipe curate: {{ manifest.source.location }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 1.5em auto; padding: 0 1em; color: #222; }
h1, p, td { overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; font-size: 0.9em; }
.pairs { display: flex; flex-wrap: wrap; gap: 0.8em; }
figure { margin: 0; border: 1px solid #ddd; padding: 0.3em; max-width: 100%; }
figure img { width: {{ px }}px; height: {{ px }}px; object-fit: contain; image-rendering: pixelated; background: #f4f4f4; }
figcaption { font-size: 0.75em; max-width: {{ 2 * px + 10 }}px; overflow-wrap: anywhere; }
</style></head><body>
<h1>vitpipe curate</h1>
<p>{{ manifest.rows }} samples in, {{ manifest.written }} kept{% if manifest.undecodable %}, {{ manifest.undecodable }}
undecodable (kept){% endif %}. Input: {{ manifest.source.location }}; every removed key is listed in curation.jsonl.</p>
<table><tr><th>reason</th><th>removed</th></tr>
{% for reason, n in manifest.removed.items() %}<tr><td>{{ reason }}</td><td>{{ n }}</td></tr>{% endfor %}
</table>
{% for reason, pairs in examples.items() %}
<h2>{{ reason }}: {{ manifest.removed[reason] }} removed{% if manifest.removed[reason] > pairs|length %} (the first {{ pairs|length }}){% endif %}</h2>
<div class="pairs">
{% for pair in pairs %}<figure>
{% if pair.removed_src %}<img src="{{ pair.removed_src }}" alt="removed {{ pair.key }}">{% else %}<span>(no image)</span>{% endif %}{% if pair.other_src %}<img src="{{ pair.other_src }}" alt="{{ pair.other_key }}">{% endif %}
<figcaption>removed {{ pair.key }}{% if pair.other_key %}; repeats {{ pair.other_key }}{% endif %}{% if pair.score is not none %}; score {{ '%.3g' % pair.score }}{% endif %}</figcaption>
</figure>{% endfor %}
</div>
{% endfor %}
</body></html>
""", autoescape=True)


def examples_wanted(items: list[Item], removed: dict[int, Removal]) -> dict[str, list[tuple[Item, Removal]]]:
    """reason -> its first removals in shard order (the ones the page shows)."""
    shown: dict[str, list[tuple[Item, Removal]]] = {}
    for item in items:
        removal = removed.get(item.position)
        if removal is not None and len(shown.setdefault(removal.reason, [])) < EXAMPLES_PER_REASON:
            shown[removal.reason].append((item, removal))
    return shown


def keys_wanted(shown: dict[str, list[tuple[Item, Removal]]]) -> set[str]:
    return {key for pairs in shown.values() for item, removal in pairs for key in (item.key, removal.duplicate_of) if key}


def thumbnail(sample: dict[str, bytes]) -> str | None:
    """A data: URI of the sample's image fitted in THUMB_PX (None: it does not decode)."""
    image = sample_image(sample)
    if image is None:
        return None
    image.thumbnail((THUMB_PX, THUMB_PX))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def write_page(directory: Path, manifest: dict[str, Any], shown: dict[str, list[tuple[Item, Removal]]],
               thumbs: dict[str, str]) -> Path:
    """``thumbs``: key -> data URI of every image the page shows (an evaluation image's key is
    prefixed with its set: "SET/KEY", as curation.jsonl's ``against`` names it)."""
    examples = {}
    for reason, pairs in shown.items():
        examples[reason] = []
        for item, removal in pairs:
            other = removal.duplicate_of
            lookup = f"{removal.extra['against']}/{other}" if "against" in removal.extra else other
            examples[reason].append({"key": item.key, "removed_src": thumbs.get(item.key), "other_key": other,
                                     "other_src": thumbs.get(lookup) if other else None, "score": removal.score})
    page = directory / "curation" / "index.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(TEMPLATE.render(manifest=manifest, examples=examples, px=THUMB_PX))
    return page
