"""Where a 12-block linear probe's time goes, and the probe trained one layer at a time against all
layers (and their concatenation) in one pass.

    python benchmarks/probe_speed.py --run RUN --train FM/train --test FM/test [--precision fp32]

RUN is a ViT run (e.g. the shoot-out's MAE); FM an ingest of Fashion-MNIST. Times, in this process:
feature extraction of every block for train and test (read from RUN's feature cache when `vitpipe
compare` or an eval made them already, unless --fresh: then into a new cache, timed), then the
probe sweep (21 heads, 30 epochs, the defaults) of the 12 blocks plus their concatenation, once as
before this change (each layer trained alone, the concatenation as a 2304-wide array) and once as
`vitpipe eval linear-probe --layers all --concat` does it now (one pass); prints each layer's
held-out and test top-1 both ways.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from vitpipe.downstream.evaluate import _probe_layers
from vitpipe.downstream.features import EncoderSource, extract, layer_names
from vitpipe.downstream.probe import ProbeSettings, linear_probe
from vitpipe.runlayout import RunLayout


def one_at_a_time(names, train_set, test_set, settings):
    """The probe as it ran before the sets were batched: every layer alone, then the concatenation."""
    results = {name: linear_probe(train_set.features[name], train_set.labels, test_set.features[name],
                                  test_set.labels, settings) for name in names}
    stacked = [np.concatenate([s.features[n] for n in names], axis=1) for s in (train_set, test_set)]
    results["+".join(names)] = linear_probe(stacked[0], train_set.labels, stacked[1], test_set.labels, settings)
    return results


def bf16_heads(names, sets, settings, fp32) -> None:
    """The one-pass probe again with LinearHeads.batch_major under bf16 autocast (patched here only)."""
    import torch

    from vitpipe.downstream.probe import LinearHeads

    plain = LinearHeads.batch_major

    def autocast_major(self, features):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return plain(self, features).float()

    LinearHeads.batch_major = autocast_major
    try:
        start = time.perf_counter()
        found = _probe_layers(names, *sets, settings, concat=True)
        print(f"one pass with bf16 heads: {time.perf_counter() - start:.1f} s")
    finally:
        LinearHeads.batch_major = plain
    for name, result in found.items():
        print(f"  {name if len(name) < 20 else 'concatenation'}: test top-1 {fp32[name].top1:.4f} fp32, "
              f"{result.top1:.4f} bf16 heads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--precision", default="auto", help="feature extraction: auto | fp32 | bf16")
    parser.add_argument("--fresh", action="store_true", help="extract into a new cache (time the extraction)")
    parser.add_argument("--bf16-heads", action="store_true",
                        help="also time the one-pass probe with its heads' matmuls under bf16 autocast (not adopted)")
    args = parser.parse_args()
    source = EncoderSource.resolve(args.run).with_precision(args.precision).resolved()
    layers = list(range(source.depth()))
    names = layer_names(layers)
    sets, seconds = [], []
    cache = Path(tempfile.mkdtemp(prefix="probe-speed-")) if args.fresh else RunLayout.of(args.run).cache
    for spec in (args.train, args.test):
        start = time.perf_counter()
        sets.append(extract(source, spec, layers=layers, cache_dir=cache))
        seconds.append(time.perf_counter() - start)
    if args.fresh:
        shutil.rmtree(cache)
    print(f"features ({source.precision}, {'extracted' if args.fresh else 'from the run cache when there'}): "
          f"train {seconds[0]:.1f} s, test {seconds[1]:.1f} s ({len(sets[0].keys)} + {len(sets[1].keys)} images)")
    settings = ProbeSettings()
    start = time.perf_counter()
    before = one_at_a_time(names, *sets, settings)
    alone = time.perf_counter() - start
    start = time.perf_counter()
    now = _probe_layers(names, *sets, settings, concat=True)
    together = time.perf_counter() - start
    print(f"probe of {len(names)} blocks + concatenation: one layer at a time {alone:.1f} s, one pass {together:.1f} s "
          f"({alone / together:.2f}x)")
    if args.bf16_heads:
        bf16_heads(names, sets, settings, now)
    print("| layer | held-out top-1, alone / one pass | test top-1, alone / one pass |\n|---|---:|---:|")
    for name, result in now.items():
        print(f"| {name if len(name) < 20 else 'concatenation'} | {before[name].val_top1:.4f} / {result.val_top1:.4f} "
              f"| {before[name].top1:.4f} / {result.top1:.4f} |")


if __name__ == "__main__":
    main()
