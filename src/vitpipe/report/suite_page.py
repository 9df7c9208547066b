"""OUT/index.html of `vitpipe eval suite`: one table per eval (datasets down, runs across), each
number beside its random init and raw pixels, the contamination of every cell and the average over
datasets. One self-contained file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from vitpipe.atomic import write_text_atomic

TEMPLATE = jinja2.Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>vitpipe eval suite</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 1.5em auto; padding: 0 1em; color: #222; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; font-size: 0.9em; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
.base { color: #777; font-size: 0.85em; }
.up { color: #1a7f37; } .down { color: #b42318; } .warn { color: #b42318; }
tr.avg td { font-weight: 600; border-top: 2px solid #888; }
</style></head><body>
<h1>vitpipe eval suite</h1>
<p>{{ result.datasets|length }} dataset(s), {{ result.runs|length }} run(s), created {{ result.created }}.
Each cell: the pretrained encoder's score (its difference to the random init of the same architecture),
then <span class="base">random init / raw pixels</span>. Contamination: the share of a dataset's test images with
a near-copy in the run's pretraining data or the dataset's train shards.</p>
{% for task in result.evals %}
<h2>{{ task }} <small>({{ result.headline[task] }})</small></h2>
<div class="scroll"><table>
<tr><th>dataset</th>{% for run in result.runs %}<th>{{ run }} <small>({{ result.objectives[run] }})</small></th>{% endfor %}</tr>
{% for row in result.datasets %}{% if task in row.dataset.evals %}<tr><td>{{ row.dataset.name }}</td>
{% for run in result.runs %}{% set cell = row.runs[run] %}<td>
{% if cell.refused %}<span class="warn">refused: {{ '%.2f' % (100 * cell.contamination.fraction) }}% contaminated</span>
{% elif cell.evals[task].skipped %}<span class="base">{{ cell.evals[task].skipped }}</span>
{% else %}{% set s = cell.evals[task] %}{{ '%.3f' % s.trained.score }}
<span class="{{ 'up' if s.delta_vs_random > 0 else 'down' }}">({{ '%+.3f' % s.delta_vs_random }})</span><br>
<span class="base">{{ '%.3f' % s.random.score }}{% if s.pixels %} / {{ '%.3f' % s.pixels.score }}{% endif %}</span>
<br><span class="base">contamination {{ '%.2f' % (100 * cell.contamination.fraction) }}%</span>{% endif %}
</td>{% endfor %}</tr>{% endif %}{% endfor %}
<tr class="avg"><td>average</td>{% for run in result.runs %}{% set a = result.average[run].get(task) %}<td>
{% if a %}{{ '%.3f' % a.trained.mean }} <span class="base">over {{ a.trained.datasets }}; random {{ '%.3f' % a.random.mean }}{% if a.pixels %}, pixels {{ '%.3f' % a.pixels.mean }}{% endif %}</span>{% else %}&ndash;{% endif %}
</td>{% endfor %}</tr>
</table></div>
{% endfor %}
<p>Every result: suite.json; each eval's own file under results/DATASET/RUN/.</p>
</body></html>
""", autoescape=True)


def write_suite_page(result: dict[str, Any], out: Path) -> Path:
    path = Path(out) / "index.html"
    write_text_atomic(path, TEMPLATE.render(result=result))
    return path
