"""Representation quality on Fashion-MNIST: a pretrained ViT (MAE, I-JEPA, ...) vs random init vs raw pixels.

    python benchmarks/quality.py --out /work/bench/recipe --config configs/mae_fashion_mnist_cpu.yaml \
        --pretrain-steps 1700 --layers 3,5,7,9,11 --concat --finetune-steps 150 \
        --finetune-args "--probe-init finetune.freeze_blocks=9 data.crop_scale_min=0.5 finetune.label_smoothing=0 model.drop_path=0"

Pretrains on the train split only, probes/fine-tunes on train, reports on the official test split.
Every row is produced by the public commands (printed as they run) and timed. Prints a Markdown
table and writes OUT/quality.json. Reruns resume: finished runs and cached features are reused.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from vitpipe.cli import main as vitpipe


def step(args: list[str]) -> float:
    print("$ vitpipe " + " ".join(args), flush=True)
    start = time.monotonic()
    code = vitpipe(args)
    if code != 0:
        raise SystemExit(f"failed ({code}): vitpipe {' '.join(args)}")
    return time.monotonic() - start


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--objective", default="mae")
    parser.add_argument("--config", default="configs/mae_fashion_mnist.yaml")
    parser.add_argument("--pretrain-steps", type=int, default=850)
    parser.add_argument("--finetune-steps", type=int, default=600)
    parser.add_argument("--fractions", default="0.01,0.1,1.0")
    parser.add_argument("--pool", default=None, help="probe pooling (default: the model's)")
    parser.add_argument("--layers", default=None,
                        help="blocks to probe (0-based, e.g. 5,8,11); each encoder's k-NN then uses the block its "
                             "probe picked on the validation split")
    parser.add_argument("--concat", action="store_true", help="also probe the --layers concatenated")
    parser.add_argument("--finetune-args", default="", help="extra `vitpipe eval finetune` flags and key=value "
                                                            "settings, quoted")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the pretraining config")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = args.out
    shards, run = out / "shards", out / args.objective
    label = args.objective.upper()
    rows: list[dict] = []

    def record(row: dict) -> None:  # saved after every row: a long run that is cut off keeps what it measured
        rows.append(row)
        out.mkdir(parents=True, exist_ok=True)
        (out / "quality.json").write_text(json.dumps(rows, indent=2) + "\n")

    if not (shards / "manifest.json").exists():
        step(["ingest", "fashion-mnist", "--out", str(shards), "--shard-size", "5000"])
    train, test = str(shards / "train"), str(shards / "test")
    seconds = step(["pretrain", args.objective, "--config", args.config, "--data", train, "--out", str(run), "--resume", "auto",
                    f"train.max_steps={args.pretrain_steps}", *args.overrides])
    record({"row": f"{label} pretraining", "steps": args.pretrain_steps, "seconds": round(seconds)})
    pool = ["--pool", args.pool] if args.pool else []
    picked: dict[str, list[str]] = {}  # encoder -> the k-NN --layer its probe picked
    for task in ("linear-probe", "knn"):
        for name, flags in ((label, []), ("random init", ["--init", "random"]), ("raw pixels", ["--pixels"])):
            layer = picked.get(name, []) if task == "knn" else []
            layers = ["--layers", args.layers] if task == "linear-probe" and args.layers and flags != ["--pixels"] else []
            layers += ["--concat"] if layers and args.concat else []
            seconds = step(["eval", task, str(run), "--train", train, "--test", test, *flags, *pool, *layers, *layer])
            suffix = {label: "", "random init": ".random", "raw pixels": ".pixels"}[name]
            result = json.loads((run / "eval" / f"{task}{suffix}.json").read_text())
            if layers:  # k-NN takes one block: the single block the probe's validation split liked best
                single = {k: v for k, v in result["per_layer"].items() if "+" not in k}
                best = max(single, key=lambda k: single[k]["val_top1"])
                picked[name] = ["--layer", best.removeprefix("block")]
            where = f" ({result['pool']}, {result['layer']})" if "layer" in result and flags != ["--pixels"] else ""
            record({"row": f"{task}: {name}{where}", "top1": result["top1"], "seconds": round(seconds)})
    if args.objective == "igpt":  # held-out likelihood and completions: what a generative model is for
        seconds = step(["eval", "bits-per-dim", str(run), "--test", test])
        result = json.loads((run / "eval" / "bits-per-dim.json").read_text())
        record({"row": f"bits per dim on test (uniform palette: {result['uniform_bits']:.2f})",
                "value": result["bits_per_dim"], "seconds": round(seconds)})
        step(["sample", str(run), "--prompt", test, "--n", "8", "--out", str(out / "completions.png")])
    for fraction in [float(f) for f in args.fractions.split(",") if f.strip()]:  # "" skips fine-tuning
        for name, flags in ((f"from {label}", []), ("from scratch", ["--init", "random"])):
            seconds = step(["eval", "finetune", str(run), "--train", train, "--test", test,
                            f"data.subset_fraction={fraction}", f"train.max_steps={args.finetune_steps}", *flags,
                            *shlex.split(args.finetune_args)])
            stem = "finetune" if fraction == 1.0 else f"finetune-labels{fraction:g}"
            result = json.loads((run / "eval" / f"{stem}{'.random' if flags else ''}.json").read_text())
            record({"row": f"fine-tune {fraction:g} labels: {name}", "top1": result["top1"],
                    "seconds": round(seconds)})
    print("\n| row | top-1 | wall-clock s |\n|---|---:|---:|")
    for row in rows:
        top1 = f"{row['top1']:.4f}" if "top1" in row else f"{row['value']:.4f}" if "value" in row else "—"
        print(f"| {row['row']} | {top1} | {row['seconds']} |")


if __name__ == "__main__":
    main()
