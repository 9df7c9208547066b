#!/usr/bin/env bash
# Everything vitpipe needs on a fresh Debian machine with Python 3.10+ (no GPU needed).
# Safe to rerun: apt and pip skip what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
if command -v apt-get >/dev/null; then
    # Fashion-MNIST (demo, benchmarks, slow tests) and openclipart (image-text benchmark); Chromium renders the report in its browser test;
    # slurm-wlm + munge run a real single-node SLURM for the cluster tests; a JRE runs Spark (ingest distributor=pyspark)
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dataset-fashion-mnist openclipart-png chromium slurm-wlm munge openjdk-17-jre-headless >/dev/null
fi
# The two pins first: pip takes them from the local wheel cache on our machines; a looser
# requirement would pull another multi-GB build.
python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q -e ".[dev,spark,onnx,wandb,mlflow,serve]"
