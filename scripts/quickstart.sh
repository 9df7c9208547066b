#!/usr/bin/env bash
# Fashion-MNIST -> shards -> MAE pretraining -> timm export, with the public commands (CPU, ~5 min).
# Rerunnable: finished steps are skipped or resumed.
set -euo pipefail
OUT="${1:-runs/quickstart}"
vitpipe ingest fashion-mnist --out "$OUT/shards" --shard-size 5000
vitpipe shards verify "$OUT/shards"
vitpipe pretrain mae --config configs/mae_fashion_mnist.yaml --data "$OUT/shards/train" --out "$OUT/mae" \
    --resume auto model.size=mini train.max_steps=300 train.batch_size=128 train.ckpt_every_steps=100
vitpipe export "$OUT/mae" --format timm --out "$OUT/export"
echo "shards:   $OUT/shards (manifest.json)"
echo "run:      $OUT/mae (metrics.jsonl, tb/, checkpoints/)"
echo "export:   $OUT/export (model.safetensors + config.json for timm)"
