"""The four-objective shoot-out on Fashion-MNIST: the same CPU budget each, then `vitpipe compare`.

    python benchmarks/shootout.py --out /work/bench/shootout [--minutes 20] [--objectives mae,jepa,igpt,clip]
        [--layers all] [--finetune-steps 300] [--label-fraction 0.1]

1. `vitpipe ingest fashion-mnist` (train 60k / test 10k); for CLIP, class folders with captions
   from class-name templates (benchmarks/clip_quality.py), ingested the same way: a separately
   marked row, since its captions carry the labels.
2. Each objective with its recipe, configs/<objective>_fashion_mnist_cpu.yaml (ViT-Ti/4 at 32 px
   where it uses a ViT; iGPT: its 16x16 pixel transformer). The budget is wall-clock: a 30-step
   calibration run measures the objective's images/s on this machine, and the run gets
   max_steps = minutes x images/s / batch (its schedule then ends on time).
3. `vitpipe compare` on every run: linear probe (--layers: every block and their concatenation by
   default, picked on held-out train images), k-NN on the single block the probe picked, each
   beside random init and raw pixels.
4. `vitpipe compare` on the best encoder (highest probe accuracy on the held-out train images,
   never the test split): fine-tune on --label-fraction of the labels for --finetune-steps,
   beside the same fine-tune from scratch, both with the head started from a linear probe and
   --finetune-recipe (chosen on a train shard, RESULTS.md). The issue asks for the best encoder's; a fine-tune
   costs ~1.5 s a step here, so one for every run would double the benchmark).
Every step is a public `vitpipe` command (printed, timed). Writes OUT/compare/compare.json and
index.html, and prints the table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clip_quality import fashion_folders
from vitpipe.config import to_dict
from vitpipe.config.io import merge, read_yaml
from vitpipe.downstream.cost import checkpoint_state
from vitpipe.downstream.features import layer_label
from vitpipe.ssl import registry
from quality import step  # the same printed, timed `vitpipe` step

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# the 10%-label fine-tune recipe picked on a training shard (RESULTS.md, "Fine-tuning"), with LP-FT
FINETUNE_RECIPE = "finetune.freeze_blocks=9 data.crop_scale_min=0.5 finetune.label_smoothing=0 model.drop_path=0"


def images_per_second(run: Path) -> float:
    """Median throughput of the calibration run's logged steps after the first (warm-up) ones."""
    rates = sorted(json.loads(line)["img_per_s"] for line in (run / "metrics.jsonl").read_text().splitlines()
                   if "img_per_s" in line and json.loads(line).get("step", 0) > 10)
    return rates[len(rates) // 2]


def pretrain(objective: str, data: Path, out: Path, minutes: float) -> dict:
    config = CONFIGS / f"{objective}_fashion_mnist_cpu.yaml"
    batch = int(read_yaml(config)["train"]["batch_size"])
    calibration = out / f"calibrate_{objective}"
    calibrating = {"max_steps": 30, "log_every": 1, "tensorboard": False}
    refuse_other_recipe(calibration, config, calibrating)  # an older recipe's speed would set the wrong budget
    if not (calibration / "encoder.safetensors").exists():
        step(["pretrain", objective, "--config", str(config), "--data", str(data), "--out", str(calibration),
              "--resume", "auto", *[f"train.{key}={str(value).lower()}" for key, value in calibrating.items()]])
    rate = images_per_second(calibration)
    steps = max(1, int(minutes * 60 * rate / batch))
    run = out / objective
    refuse_other_recipe(run, config, {"max_steps": steps})  # nor may an older recipe's run stand in for this one
    state = checkpoint_state(run)
    if state.get("step") != steps:  # not finished earlier
        step(["pretrain", objective, "--config", str(config), "--data", str(data), "--out", str(run),
              "--resume", "auto", f"train.max_steps={steps}"])
        state = checkpoint_state(run)
    # the trainer's own wall-clock (the same figure compare reports), not this process's
    return {"objective": objective, "calibrated_img_per_s": rate, "steps": steps, "batch": batch,
            "seconds": round(state["wall_seconds"])}


def refuse_other_recipe(run: Path, recipe: Path, train: dict) -> None:
    """Exit when ``run`` exists with settings other than the recipe's and ``train``'s."""
    if not (run / "config.yaml").is_file():
        return
    have = to_dict(registry.run_config(run / "config.yaml"))
    want = merge(read_yaml(recipe), {"train": train})
    stale = [f"{section}.{key}" for section, values in want.items() for key, value in values.items()
             if have.get(section, {}).get(key) != value]
    if stale:
        raise SystemExit(f"{run} was pretrained with other settings ({', '.join(stale)}): move it away or use another --out")


def table(result: dict) -> str:
    lines = ["| objective | steps x batch | minutes | probe (layer) | k-NN (layer) | fine-tune | random init probe / k-NN / "
             "fine-tune | pixels probe / k-NN |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["runs"]:
        e, cost = row["evals"], row["cost"]
        name = row["objective"] + (" (captions from class names: separate row)" if row["objective"] == "clip" else "")
        get = lambda task, kind: f"{e[task][kind]['top1']:.3f}" if task in e and kind in e[task] else "-"  # noqa: E731
        layer = layer_label(e.get("probe", {}).get("trained", {}).get("layer", ""))
        knn_layer = e.get("knn", {}).get("trained", {}).get("layer", "")
        lines.append(f"| {name} | {cost['steps']} x {cost['samples_seen'] // max(1, cost['steps'])} | "
                     f"{cost['wall_seconds'] / 60:.1f} | "
                     f"{get('probe', 'trained')} ({layer}) | {get('knn', 'trained')} ({knn_layer}) | {get('finetune', 'trained')} | "
                     f"{get('probe', 'random')} / {get('knn', 'random')} / {get('finetune', 'random')} | "
                     f"{get('probe', 'pixels')} / {get('knn', 'pixels')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=20.0, help="pretraining budget per objective (wall-clock)")
    parser.add_argument("--objectives", default="mae,jepa,igpt,clip")
    parser.add_argument("--layers", default="all", help="compare --layers: all, auto or last")
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--label-fraction", type=float, default=0.1)
    parser.add_argument("--finetune-recipe", default=FINETUNE_RECIPE,
                        help="key=value settings of the fine-tune (RESULTS.md: chosen on a train shard)")
    parser.add_argument("--suite", default="probe,knn", help="the suite every run gets")
    parser.add_argument("--no-finetune", action="store_true", help="skip the best encoder's fine-tune")
    parser.add_argument("--eval-train-shards", type=int, default=0,
                        help="evals train on the first K shards (10,000 images each) of the train split; 0 = all 60,000")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    fm = out / "fm"
    if not (fm / "manifest.json").exists():
        step(["ingest", "fashion-mnist", "--out", str(fm)])
    objectives = args.objectives.split(",")
    if "clip" in objectives and not (out / "captions" / "train" / "manifest.json").exists():
        fashion_folders(out / "folders", 60_000)
        for split in ("train", "test"):
            step(["ingest", str(out / "folders" / split), "--out", str(out / "captions" / split), "--shard-size",
                  "10000", "image_size=32", "resize_mode=border"])
    runs = []
    for objective in objectives:
        data = out / "captions" / "train" if objective == "clip" else fm / "train"
        runs.append(pretrain(objective, data, out, args.minutes))
    (out / "pretraining.json").write_text(json.dumps(runs, indent=2) + "\n")
    train = fm / "train"
    if args.eval_train_shards:
        chosen = [str(p) for p in sorted(train.glob("*.tar"))[:args.eval_train_shards]]
        train = chosen[0] if len(chosen) == 1 else "{" + ",".join(chosen) + "}"  # braces need two items
    common = ["--train", str(train), "--test", str(fm / "test")]
    step(["compare", *[str(out / o) for o in objectives], *common, "--out", str(out / "compare"), "--suite", args.suite,
          "--layers", args.layers, "--concat", *(["--knn-layer", "probe"] if "probe" in args.suite else [])])
    result = json.loads((out / "compare" / "compare.json").read_text())
    if not args.no_finetune:
        # CLIP's captions carry the labels: its row stands apart and is never "the best encoder"
        candidates = [row for row in result["runs"] if row["objective"] != "clip"] or result["runs"]
        best = max(candidates, key=lambda row: row["evals"]["probe"]["trained"]["val_top1"])
        recipe = [f"train.max_steps={args.finetune_steps}", *args.finetune_recipe.split()]
        step(["compare", best["run"], *common, "--out", str(out / "compare_finetune"), "--suite", "finetune",
              "--label-fraction", str(args.label_fraction), "--finetune-probe-init",
              *[arg for setting in recipe for arg in ("--finetune-set", setting)]])
        finetuned = json.loads((out / "compare_finetune" / "compare.json").read_text())["runs"][0]
        best["evals"]["finetune"] = finetuned["evals"]["finetune"]
    print(table(result))


if __name__ == "__main__":
    main()
