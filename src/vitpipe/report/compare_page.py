"""OUT/index.html of `vitpipe compare`: one table, a bar chart per eval, the per-layer probe
curves overlaid, links to each run's own report. Self-contained (PNG files beside it, no network)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from vitpipe.atomic import write_text_atomic  # noqa: E402
from vitpipe.downstream.features import layer_label, single_blocks  # noqa: E402

TITLES = {"probe": "Linear probe top-1", "knn": "k-NN top-1 (k=20)", "finetune": "Fine-tune top-1"}
COLOURS = {"trained": "#3b6fb6", "random": "#b8b8b8", "pixels": "#e0a040"}
LABELS = {"trained": "pretrained", "random": "random init", "pixels": "raw pixels"}


def bar_chart(result: dict[str, Any], task: str, out: Path) -> Path:
    runs = result["runs"]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(runs) + 1.5), 3.2))
    kinds = [k for k in COLOURS if all(k in r["evals"][task] for r in runs)]
    width = 0.8 / len(kinds)
    for offset, kind in enumerate(kinds):
        values = [r["evals"][task][kind]["top1"] for r in runs]
        positions = [i + (offset - (len(kinds) - 1) / 2) * width for i in range(len(runs))]
        bars = ax.bar(positions, values, width, color=COLOURS[kind], label=LABELS[kind])
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
    ax.set_xticks(range(len(runs)), [_run_label(r, "\n") for r in runs], fontsize=8)
    ax.set_ylim(0, 1.22)  # headroom for the legend above the bars
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("top-1")
    ax.set_title(TITLES[task])
    ax.legend(fontsize=7, loc="upper center", ncol=len(kinds), frameon=False)
    fig.tight_layout()
    path = out / f"{task}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _run_label(row: dict[str, Any], separator: str) -> str:
    """The objective, and the run's name where it says more ("mae", not "mae mae")."""
    return row["objective"] if row["name"] == row["objective"] else f"{row['objective']}{separator}{row['name']}"


def layer_curves(result: dict[str, Any], out: Path) -> Path | None:
    """Probe top-1 per block, blocks at their relative depth so encoders of different depth overlay."""
    curves = []
    for row in result["runs"]:
        per_layer = row["evals"].get("probe", {}).get("trained", {}).get("per_layer", {})
        blocks = list(single_blocks(per_layer).items())
        if len(blocks) > 1:
            curves.append((row, blocks))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for row, blocks in curves:
        depth = row["encoder"]["depth"]
        ax.plot([(b + 1) / depth for b, _ in blocks], [t for _, t in blocks], marker="o", markersize=3,
                label=_run_label(row, " "))
    ax.set_xlabel("block / depth (1 = output)")
    ax.set_ylabel("probe top-1")
    ax.set_title("Linear probe per layer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "layers.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cost(cost: dict[str, Any]) -> str:
    parts = []
    if cost.get("samples_seen") is not None:
        parts.append(f"{cost['samples_seen']:,} samples")
    if cost.get("wall_seconds") is not None:
        seconds = cost["wall_seconds"]
        parts.append(f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s")
    if cost.get("flops"):
        scale, unit = next((s, u) for s, u in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1, "FLOP"))
                           if cost["flops"] >= s)
        parts.append(f"{cost['flops'] / scale:.1f} {unit}")
    return ", ".join(parts) or "unknown"


def _leaks(figure: dict[str, Any] | None) -> str:
    if not figure:
        return "not measured"
    where = ", ".join(f"{name} {n}" for name, n in figure["by_reference"].items() if n)
    return html.escape(f"{100 * figure['fraction']:.2f}% ({figure['contaminated']} of {figure['test_images']}"
                       f"{': ' + where if where else ''})")


def _table(result: dict[str, Any]) -> str:
    esc = html.escape
    tasks = result["settings"]["suite"]
    head = "".join(f"<th>{esc(TITLES[t])}<br><small>pretrained (vs random) / random / pixels</small></th>" for t in tasks)
    body = []
    for row in result["runs"]:
        encoder = row["encoder"]
        cells = [f"<td>{esc(row['objective'])}</td>", f"<td>{esc(row['name'])}</td>",
                 f"<td>{esc(encoder['size'])} ({encoder['embed_dim']}x{encoder['depth']}), patch {encoder['patch_size']}, "
                 f"{encoder['image_size']} px, {encoder['parameters'] / 1e6:.1f} M</td>",
                 f"<td>{esc(_cost(row['cost']))}</td>", f"<td>{_leaks(row.get('contamination'))}</td>"]
        for task in tasks:
            scores = row["evals"][task]
            delta = scores["delta_vs_random"]
            worse = ' class="worse"' if delta < 0 or ("pixels" in scores and scores["trained"]["top1"] < scores["pixels"]["top1"]) else ""
            layer = f" @{layer_label(scores['trained']['layer'])}" if scores["trained"].get("layer") not in (None, "last") else ""
            others = " / ".join(f"{scores[k]['top1']:.3f}" for k in ("random", "pixels") if k in scores)
            shared = scores["random"].get("same_as")  # one random encoder measured once for identical runs
            note = f"<br><small>random init: the same weights as {esc(shared)}'s</small>" if shared else ""
            cells.append(f"<td{worse}><b>{scores['trained']['top1']:.3f}</b>{esc(layer)} ({delta:+.3f}) / {others}{note}</td>")
        report = f"<a href=\"{esc(row['report'])}\">report</a>" if row.get("report") else "<small>vitpipe report RUN</small>"
        cells.append(f"<td>{report}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<div class=\"wide\"><table><tr><th>objective</th><th>run</th><th>encoder</th><th>pretraining cost</th><th>contamination<br><small>test images with a near-copy</small></th>{head}"
            f"<th>run report</th></tr>{''.join(body)}</table></div>")


def write_page(result: dict[str, Any], out: Path) -> Path:
    esc = html.escape
    figures = [bar_chart(result, task, out) for task in result["settings"]["suite"]]
    curves = layer_curves(result, out)
    images = "".join(f"<img src=\"{esc(p.name)}\" alt=\"{esc(p.stem)}\">" for p in [*figures, *([curves] if curves else [])])
    warnings = "".join(f"<p class=\"warn\">{esc(w)}</p>" for w in result["warnings"])
    settings = result["settings"]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vitpipe compare</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 1.5em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; font-size: 0.9em; vertical-align: top; }}
td, h1, p {{ overflow-wrap: anywhere; }}
td.worse {{ background: #fde8e8; }}
.wide {{ overflow-x: auto; }}
.warn {{ color: #a04000; }}
img {{ max-width: 100%; height: auto; border: 1px solid #eee; margin: 0.3em 0; }}
@media (max-width: 600px) {{ body {{ margin: 0.5em auto; }} th, td {{ font-size: 0.8em; padding: 0.2em 0.35em; }} }}
</style></head><body>
<h1>vitpipe compare: {len(result['runs'])} runs</h1>
<p>Train {esc(result['train'])}, test {esc(result['test'])} (top-1 on
{result['test_samples']} test samples); created {esc(result['created'])}. Linear probe:
{settings['probe_epochs']} epochs, layers {esc(settings['layers'])}; fine-tune on {settings['label_fraction']:g} of
the labels. Each pretrained number is shown with its difference to the random init of the same
architecture; a red cell lost to random init or to raw pixels.</p>
{warnings}
{_table(result)}
{images}
</body></html>
"""
    path = out / "index.html"
    write_text_atomic(path, page)
    return path
