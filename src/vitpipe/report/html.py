"""`vitpipe report RUN`: one self-contained HTML page plus its PNGs under RUN/report/."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

import torch

from vitpipe.runlayout import RunLayout
from vitpipe.atomic import write_text_atomic
from vitpipe.config import ConfigError, PretrainConfig
from vitpipe.pipeline.loader import ReadTally, counted, eval_loader
from vitpipe.pipeline.shardset import has_labels, images_by_key, resolve_shards
from vitpipe.pipeline.transforms import TransformSpec, build_transform
from vitpipe.report import figures
from vitpipe.report.plots import last_per_step, loss_curve, read_metrics
from vitpipe.report.sections import FigureContext, figure_sections
from vitpipe.ssl import registry
from vitpipe.ssl.runs import load_run_encoder

SAMPLE_IMAGES = 6


def held_out_shards(train: str) -> str:
    """The split beside the training shards that a run never saw (``S/val`` or ``S/test`` next to
    ``S/train``), else the training shards themselves."""
    directory = Path(train)
    if directory.is_dir() and directory.name == "train":
        for name in ("val", "test"):
            if (directory.parent / name / "sizes.json").is_file():
                return str(directory.parent / name)
    return train


def _sample_batch(config: PretrainConfig, shards: str, count: int, pool: int = 512) -> torch.Tensor:
    """``count`` example images spread over the labels (one of each label in turn, from the first
    ``pool`` samples), not the first ``count`` samples of the first shard."""
    shard_set = resolve_shards(shards)
    labelled = has_labels(shard_set.urls[0])
    loader = eval_loader(shard_set, config.data, ("image", "label") if labelled else ("image",), batch_size=pool)
    batch = next(counted(loader, ReadTally(None)))
    if not labelled:
        return batch["image"][:count]
    by_label: dict[int, list[int]] = {}
    for index, label in enumerate(batch["label"].tolist()):
        by_label.setdefault(label, []).append(index)
    order = [rows[i] for i in range(max(map(len, by_label.values()))) for rows in by_label.values() if i < len(rows)]
    return batch["image"][order[:count]]


def _load_objective(run_dir: Path):
    """The whole objective (decoder and all) from the newest verified checkpoint, or None."""
    from safetensors.torch import load_file

    from vitpipe.ssl.engine.checkpoints import latest_verified, log_stderr
    from vitpipe.ssl.runs import build_run_objective

    checkpoint = latest_verified(run_dir, log_stderr, set_aside=False)
    if checkpoint is None:
        return None
    objective = build_run_objective(run_dir)
    objective.load_state_dict(load_file(checkpoint / "model.safetensors"))
    return objective.eval()


def _retrieval_section(run_dir: Path, config: PretrainConfig, encoder, out_dir: Path) -> Path | None:
    from vitpipe.downstream.retrieval import load_index, search

    directory = RunLayout(run_dir).eval / "retrieval"
    if not (directory / "index.faiss").is_file():
        return None
    index, ids = load_index(directory)
    keys = ids["keys"]
    query_keys = keys[:: max(1, len(keys) // 5)][:5]
    images = images_by_key(ids["shards"], set(query_keys))
    transform = build_transform(TransformSpec.for_eval(config.data))
    batch = torch.stack([transform(images[k]) for k in query_keys])
    with torch.no_grad():
        features = encoder.pool(encoder.forward_features(batch), ids.get("pool"))
    similarity, neighbours = search(index, features.numpy(), min(7, index.ntotal))
    hit_keys = {keys[i] for row in neighbours for i in row if i >= 0}
    hit_images = images_by_key(ids["shards"], hit_keys)
    import numpy as np

    rows = []
    for query, sims, ids_row in zip(query_keys, similarity, neighbours):
        rows.append([(np.asarray(hit_images[keys[i]]), keys[i], float(s))
                     for i, s in zip(ids_row, sims) if i >= 0 and keys[i] != query][:6])
    return figures.retrieval_grid([np.asarray(images[k]) for k in query_keys], rows, out_dir / "retrieval.png")


def _eval_rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for path in RunLayout(run_dir).results():
        result = json.loads(path.read_text())
        value, higher = result.get("top1"), True
        if "recall" in result:
            metric = ", ".join(f"R@{k} {v:.3f}" for k, v in result["recall"].items()) or "(unlabelled)"
            value = result["recall"].get("1")
        elif "bits_per_dim" in result:
            metric = f"{result['bits_per_dim']:.3f} bits per dim (uniform {result['uniform_bits']:.2f})"
            value, higher = result["bits_per_dim"], False
        else:
            metric = f"top-1 {result['top1']:.4f}"
        rows.append({"task": result.get("task", path.stem), "baseline": result.get("baseline") or "pretrained",
                     "metric": metric, "value": value, "higher_better": higher, "seconds": result.get("seconds"),
                     "file": path.name, "versus": ""})
    for row in rows:  # the pretrained number beside its baselines: deltas, and losses marked
        if row["baseline"] != "pretrained" or row["value"] is None:
            continue
        notes = []
        for other in rows:
            if other["task"] == row["task"] and other["baseline"] != "pretrained" and other["value"] is not None:
                delta = (row["value"] - other["value"]) * (1 if row["higher_better"] else -1)
                notes.append((delta, f"{'+' if delta >= 0 else '-'}{abs(delta):.3f} vs {other['baseline']}"
                                      + (" (WORSE)" if delta < 0 else "")))
        row["versus"] = "; ".join(text for _, text in notes)
        row["worse"] = any(delta < 0 for delta, _ in notes)
    return rows


def _manifest_summary(shards: str) -> list[tuple[str, str]]:
    from vitpipe.pipeline.manifest import find_manifest

    shard_set = resolve_shards(shards)
    path = find_manifest(shard_set.directory) if shard_set.directory else None
    if path is None:
        return [("shards", f"{shards} (no vitpipe manifest)")]
    manifest = json.loads(path.read_text())
    splits = ", ".join(f"{name} {split.get('written')}" for name, split in manifest.get("splits", {}).items())
    return [("manifest", str(path)), ("source", json.dumps(manifest.get("source"))),
            ("rows / written", f"{manifest.get('rows')} / {manifest.get('written')}"),
            ("failed", json.dumps(manifest.get("failures") or {})), ("filtered", json.dumps(manifest.get("filtered") or {})),
            ("duplicates", str(manifest.get("duplicates"))), ("splits", splits),
            ("labels", str(len(manifest.get("label_map") or {})) + " classes")]


def build_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not RunLayout(run_dir).config.is_file() or not RunLayout(run_dir).metrics.is_file():
        raise ConfigError(f"{run_dir} is not a pretraining run (no config.yaml / metrics.jsonl)")
    config = registry.run_config(RunLayout(run_dir).config)
    out_dir = RunLayout(run_dir).report
    out_dir.mkdir(parents=True, exist_ok=True)
    sections: list[tuple[str, str, str | None]] = []  # (title, caption, png name)
    curve = loss_curve(run_dir, out_dir / "curves.png", f"{config.objective} loss")
    sections.append(("Training", "Loss, learning rate and throughput per logged step.", curve.name))

    encoder, _, weights = load_run_encoder(run_dir)
    images = _sample_batch(config, held_out_shards(config.data.shards), SAMPLE_IMAGES)
    context = FigureContext(run_dir, config, _load_objective(run_dir), encoder, images, out_dir)
    sections += [(title, caption, png.name) for title, caption, png in figure_sections(context)]
    png = _retrieval_section(run_dir, config, encoder, out_dir)
    if png is not None:
        sections.append(("Retrieval", "Queries from the indexed set and their nearest neighbours (cosine).", png.name))

    records = last_per_step(read_metrics(run_dir))
    info = json.loads(RunLayout(run_dir).info.read_text()) if RunLayout(run_dir).info.exists() else {}
    page = _render(run_dir, config, records, info, sections, _eval_rows(run_dir), weights)
    path = out_dir / "index.html"
    write_text_atomic(path, page)
    return path


def _render(run_dir, config, records, info, sections, eval_rows, weights) -> str:
    esc = html.escape
    last = records[-1] if records else {}
    facts = [("objective", config.objective), ("steps", last.get("step")), ("final loss", _fmt(last.get("loss"))),
             ("samples seen", last.get("samples")), ("model", f"{config.model.size} / patch {config.model.patch_size} "
                                                           f"/ {config.data.image_size} px"),
             ("global batch", info.get("global_batch")), ("processes", info.get("world_size")),
             ("device / precision", f"{info.get('device')} / {info.get('precision')}"),
             ("data manifest sha256", (info.get("data_manifest_sha256") or "")[:16]),
             ("git revision", (info.get("git_revision") or "")[:12]), ("encoder", weights)]
    fact_rows = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in facts)
    if eval_rows:
        worse = ' class="worse"'
        body = "".join(f"<tr{worse if r.get('worse') else ''}><td>{esc(r['task'])}</td>"
                       f"<td>{esc(r['baseline'])}</td><td>{esc(r['metric'])}</td><td>{esc(r['versus'])}</td>"
                       f"<td>{esc(str(r['seconds']))}</td><td>{esc(r['file'])}</td></tr>" for r in eval_rows)
        evals = ("<div class=\"wide\"><table><tr><th>task</th><th>encoder</th><th>result</th><th>pretrained vs "
                 f"baselines</th><th>seconds</th><th>file</th></tr>{body}</table></div>")
    else:
        evals = "<p>No evaluations yet: run <code>vitpipe eval ...</code> on this run.</p>"
    figures_html = "".join(
        f"<section><h2>{esc(title)}</h2><p>{esc(caption)}</p><img src=\"{esc(png)}\" alt=\"{esc(title)}\"></section>"
        for title, caption, png in sections)
    data_rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in _manifest_summary(config.data.shards))
    resolved = RunLayout(run_dir).config.read_text() if RunLayout(run_dir).config.is_file() else ""
    details = (f"<section><h2>Data</h2><div class=\"wide\"><table>{data_rows}</table></div></section>"
               f"<details><summary>Resolved config (config.yaml)</summary><pre>{esc(resolved)}</pre></details>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vitpipe report: {esc(run_dir.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 1.5em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; font-size: 0.9em; vertical-align: top; }}
td, h1, p {{ overflow-wrap: anywhere; }}
h1 {{ font-size: 1.4em; }}
tr.worse td {{ background: #fde8e8; }}
.wide {{ overflow-x: auto; }}
img {{ max-width: 100%; height: auto; border: 1px solid #eee; }}
section {{ margin-bottom: 1.5em; }}
pre {{ background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }}
@media (max-width: 600px) {{ body {{ margin: 0.5em auto; }} th, td {{ font-size: 0.8em; padding: 0.2em 0.35em; }} }}
</style></head><body>
<h1>vitpipe report: {esc(str(run_dir))}</h1>
<p>Generated {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}.</p>
<div class="wide"><table>{fact_rows}</table></div>
<h2>Evaluation</h2>{evals}
{figures_html}
{details}
</body></html>
"""


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
