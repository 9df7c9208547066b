"""Does semantic dedup change what MAE learns? Fashion-MNIST train as ingested against the same
after `vitpipe curate ... semantic_dedup` removing about --remove of it, the same number of
pretraining steps each (the same compute), then linear probe and k-NN on the test split.

    python benchmarks/curate_quality.py --out /work/bench/curate_quality --steps 600 --remove 0.2

1. `vitpipe ingest fashion-mnist` (60k train / 10k test).
2. MAE (configs/mae_fashion_mnist_cpu.yaml) --steps on the train split: its encoder embeds the
   train split for the dedup (any encoder would do; this one costs nothing more).
3. `vitpipe curate` with semantic_dedup, eps raised until at least --remove of the rows go.
4. MAE again, --steps on the curated shards (a new run, same recipe and seed).
5. `vitpipe eval linear-probe` and `knn` of both on train -> test, printed side by side.
Every step is a public `vitpipe` command (printed, timed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from quality import step  # the same printed, timed `vitpipe` step

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "mae_fashion_mnist_cpu.yaml"
EPS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)  # MAE features are anisotropic: 0.002 removed 62%


def pretrain(data: Path, run: Path, steps: int) -> float:
    return step(["pretrain", "mae", "--config", str(CONFIG), "--data", str(data), "--out", str(run),
                 "--resume", "auto", f"train.max_steps={steps}", "train.tensorboard=false"])


def curated(shards: Path, encoder: Path, out: Path, remove: float) -> dict:
    """The smallest eps of EPS that removes at least ``remove`` of the rows."""
    for eps in EPS:
        step(["curate", str(shards), "--out", str(out), "--overwrite", f"semantic_dedup.encoder={encoder}",
              f"semantic_dedup.eps={eps}"])
        manifest = json.loads((out / "manifest.json").read_text())
        if manifest["rows"] - manifest["written"] >= remove * manifest["rows"]:
            return {"eps": eps, "rows": manifest["rows"], "written": manifest["written"]}
    return {"eps": EPS[-1], "rows": manifest["rows"], "written": manifest["written"]}


def scores(run: Path, train: Path, test: Path) -> dict:
    common = ["--train", str(train), "--test", str(test)]
    step(["eval", "linear-probe", str(run), *common])
    step(["eval", "knn", str(run), *common])
    read = {name: json.loads((run / "eval" / f"{name}.json").read_text()) for name in ("linear-probe", "knn")}
    return {"probe": read["linear-probe"]["top1"], "knn": read["knn"]["top1"],
            "contamination": read["knn"]["contamination"]["fraction"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--remove", type=float, default=0.2)
    args = parser.parse_args()
    fm = args.out / "fm"
    if not (fm / "manifest.json").exists():
        step(["ingest", "fashion-mnist", "--out", str(fm)])
    train, test = fm / "train", fm / "test"
    seconds = {"as ingested": pretrain(train, args.out / "mae", args.steps)}
    dedup = curated(train, args.out / "mae", args.out / "curated", args.remove)
    seconds["semantic dedup"] = pretrain(args.out / "curated", args.out / "mae-curated", args.steps)
    rows = {"as ingested": scores(args.out / "mae", train, test),
            "semantic dedup": scores(args.out / "mae-curated", train, test)}
    print(f"semantic dedup eps {dedup['eps']}: kept {dedup['written']} of {dedup['rows']} "
          f"({1 - dedup['written'] / dedup['rows']:.1%} removed); {args.steps} MAE steps each")
    print("| pretraining data | samples | pretrain (s) | linear probe | k-NN | contamination |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        samples = dedup["rows"] if name == "as ingested" else dedup["written"]
        print(f"| {name} | {samples} | {seconds[name]:.0f} | {row['probe']:.4f} | {row['knn']:.4f} | "
              f"{row['contamination']:.2%} |")


if __name__ == "__main__":
    main()
