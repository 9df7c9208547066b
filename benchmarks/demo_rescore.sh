#!/usr/bin/env bash
# The demo's headline numbers on another (larger) labelled test set, beside random init:
#   bash benchmarks/demo_rescore.sh DEMO_OUT TEST_SHARDS
# e.g. TEST_SHARDS = the 10,000 Fashion-MNIST test images (`vitpipe ingest fashion-mnist --out FM`,
# then FM/test). The run is copied first, so the demo's own results stay as they were.
set -euo pipefail
demo=$(realpath "$1"); test_shards=$(realpath "$2")
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cp -r "$demo/mae" "$scratch/mae"
blocks=$(python -c "import sys; from vitpipe.demo import probe_blocks; print(probe_blocks(sys.argv[1]))" "$scratch/mae")
for init in trained random; do
    vitpipe eval linear-probe "$scratch/mae" --train "$demo/shards/train" --test "$test_shards" --init "$init" \
        --layers "$blocks" --concat > /dev/null
    vitpipe eval knn "$scratch/mae" --train "$demo/shards/train" --test "$test_shards" --init "$init" > /dev/null
done
python - "$scratch/mae/eval" <<'PY'
import json, sys
from pathlib import Path
eval_dir = Path(sys.argv[1])
for task in ("linear-probe", "knn"):
    trained = json.loads((eval_dir / f"{task}.json").read_text())
    random = json.loads((eval_dir / f"{task}.random.json").read_text())
    print(f"{task}: {trained['top1']:.4f} vs random init {random['top1']:.4f} ({100 * (trained['top1'] - random['top1']):+.1f} points) "
          f"on {trained['test_samples']} test images")
PY
