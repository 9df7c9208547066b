"""`vitpipe compare`: one evaluation suite over several pretraining runs, each beside the random
init of its own architecture and raw pixels, with what each run's pretraining cost.

Every number comes from the `vitpipe eval` functions and lands in the run's own RUN/eval/ files;
a finished eval whose data, settings and encoder still match is read back instead of rerun, and
features are cached by `extract`, so rerunning a comparison costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from typing import Any

import torch

from vitpipe.runlayout import RunLayout
from vitpipe.atomic import write_json_atomic
from vitpipe.config import ConfigError, to_dict
from vitpipe.downstream.features import EncoderSource
from vitpipe.pipeline.census import sample_hashes
from vitpipe.pipeline.manifest import shard_hashes
from vitpipe.pipeline.shardset import resolve_shards
from vitpipe.pipeline.transforms import TransformSpec
from vitpipe.ssl import registry
from vitpipe.ssl.engine.rundir import read_run_info

SUITE = ("probe", "knn", "finetune")
BASELINES = ("trained", "random", "pixels")


@dataclass
class CompareSettings:
    suite: tuple[str, ...] = SUITE
    """Evals to run: probe (linear), knn, finetune (at ``label_fraction`` of the labels)."""
    layers: str = "auto"
    """Probe layers: auto (every block for objectives whose best layer is not the last, e.g. igpt;
    the output otherwise) | all | last."""
    label_fraction: float = 0.1
    """Fraction of the training labels the fine-tune sees (a fixed seeded subset)."""
    finetune_overrides: tuple[str, ...] = ()
    """key=value settings of every fine-tune (e.g. train.max_steps=300)."""
    probe_epochs: int = 30
    concat: bool = False
    """Where several layers are probed, one more candidate: all of them side by side (DINO's probe)."""
    knn_layer: str = "last"
    """k-NN features: last (the output) | probe (the single block the probe's held-out labels picked;
    needs probe in the suite, before knn)."""
    finetune_probe_init: bool = False
    """Start every fine-tune's head from a linear probe on its labels (LP-FT; the random init's
    probe is fitted on the random encoder's features)."""
    workers: int = 2
    """DataLoader workers for feature extraction."""
    precision: str = "auto"
    """auto | fp32 | bf16 for every encoder's forward passes (ssl/engine/precision.py's for_eval)."""
    max_contamination: float = 0.01
    """Refuse a run whose test images have near-copies in its pretraining data or in --train above
    this fraction (downstream/contamination.py)."""

    def __post_init__(self) -> None:
        unknown = set(self.suite) - set(SUITE)
        if unknown or not self.suite:
            raise ConfigError(f"--suite takes {','.join(SUITE)}; got {','.join(self.suite) or 'nothing'}")
        if self.layers not in ("auto", "all", "last"):
            raise ConfigError("--layers must be auto, all or last")
        if self.knn_layer not in ("last", "probe"):
            raise ConfigError("--knn-layer must be last or probe")
        if self.knn_layer == "probe" and "probe" not in self.suite:
            raise ConfigError("--knn-layer probe needs probe in --suite")
        if not 0 < self.label_fraction <= 1:
            raise ConfigError("--label-fraction must be in (0, 1]")
        if self.probe_epochs < 1:  # refused before the first run is evaluated, not at the probe
            raise ConfigError(f"--probe-epochs must be >= 1, got {self.probe_epochs}")


def shard_identity(spec: str) -> tuple[set[str], set[str]]:
    """(resolved local paths, manifest sha256s) of the shards ``spec`` names."""
    shards = resolve_shards(spec)
    names = {Path(url).name for url in shards.urls}
    hashes = {sha for name, sha in (shard_hashes(shards.directory) if shards.directory else {}).items() if name in names}
    return {str(Path(url).resolve()) for url in shards.urls if "://" not in url}, hashes


def check_data(runs: list[Path], test: str) -> list[str]:
    """Refuse a run whose test data overlaps its pretraining data: the same shard files, the same
    shard contents, or any same sample (per-sample sha256, so a copy of the shards without its
    manifest or the same images re-ingested into other shards is caught); warn (returned lines)
    when the runs were pretrained on different data."""
    test_paths, test_hashes = shard_identity(test)
    test_samples = sample_hashes(resolve_shards(test))
    pretrained: dict[str, set[str]] = {}  # runs pretrained on the same shards are scanned once
    manifests = {}
    for run in runs:
        config = registry.run_config(RunLayout.of(run).config)
        try:
            paths, hashes = shard_identity(config.data.shards)
            if config.data.shards not in pretrained:
                pretrained[config.data.shards] = sample_hashes(resolve_shards(config.data.shards))
        except ConfigError:  # pretraining shards moved away: nothing to compare against
            paths, hashes = set(), set()
            pretrained[config.data.shards] = set()
        shared = (paths & test_paths) | (hashes & test_hashes)
        if shared:
            raise ConfigError(f"{run}: the test shards overlap its pretraining data ({len(shared)} shard(s)); "
                              "test on a split the run never saw")
        seen = len(test_samples & pretrained[config.data.shards])
        if seen:
            raise ConfigError(f"{run}: {seen} of {len(test_samples)} test samples are in its pretraining data "
                              "(the same image by sha256, whatever the shards are called); test on data the run never saw")
        info = read_run_info(RunLayout.of(run).root)
        manifests[str(run)] = info.get("data_manifest_sha256") or config.data.shards
    warnings = []
    if len(set(manifests.values())) > 1:
        warnings.append("warning: the runs were pretrained on different data (manifests "
                        + ", ".join(f"{Path(r).name} {str(m)[:12]}" for r, m in manifests.items()) + ")")
    return warnings


def probe_layers(source: EncoderSource, setting: str) -> list[int] | None:
    if source.kind == "pixels" or setting == "last":
        return None
    spec = registry.get(source.config.objective)
    if setting == "all" or spec.probe_layers == "all":
        return list(range(source.depth()))
    return None


def reusable(path: Path, source: EncoderSource, data: dict[str, str], check) -> dict[str, Any] | None:
    """A finished eval of these data ({"train": spec, "test": spec}: the same shards and manifests),
    this encoder (newer than its weights) and these settings (``check(result)``), or None."""
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    from vitpipe.downstream.evaluate import data_id

    kept = result.get("provenance", {}).get("data", {})
    if set(kept) != set(data):
        return None
    for name, spec in data.items():
        was, now = kept[name], data_id(spec)
        # the same shards however they were named (results from before "paths": the same spec string)
        same_shards = was["paths"] == now["paths"] if "paths" in was else was.get("shards") == spec
        if not same_shards or was.get("manifest_sha256") != now["manifest_sha256"]:
            return None
    if source.weights is not None and path.stat().st_mtime < source.weights.stat().st_mtime:
        return None
    if result.get("provenance", {}).get("precision", "fp32") != source.resolved().precision:
        return None
    return result if check(result) else None


def run_eval(task: str, source: EncoderSource, train: str, test: str, settings: CompareSettings) -> dict[str, Any]:
    """One eval of the suite for one encoder source (its summary): reused when finished, else run."""
    return _summary(task, eval_result(task, source, train, test, settings))


def eval_result(task: str, source: EncoderSource, train: str, test: str, settings: CompareSettings,
                stored: Path | None = None) -> dict[str, Any]:
    """The whole result of one eval: a finished one of the same data, encoder and settings read back
    (from ``stored`` first, then RUN/eval/), else run. With ``stored`` the result is kept there too
    (``eval suite`` keeps one per dataset, where RUN/eval/ holds the latest of each task)."""
    from vitpipe.downstream.evaluate import result_path

    name, check, run = _eval_plan(task, source, train, test, settings)
    return read_back_or_run(source, {"train": train, "test": test}, check, run, stored, result_path(source, name))


def read_back_or_run(source: EncoderSource, data: dict[str, str], check, run, stored: Path | None = None,
                     *elsewhere: Path) -> dict[str, Any]:
    """The finished result at ``stored`` or else at ``elsewhere`` (``reusable``), or ``run()``'s
    (-> (path, payload)) read from the file it wrote; kept at ``stored`` unless read from there."""
    if stored is not None:
        found = reusable(stored, source, data, check)
        if found is not None:
            return found
    found = next((r for r in (reusable(p, source, data, check) for p in elsewhere) if r is not None), None)
    if found is None:
        found = _written(run())
    if stored is not None:
        write_json_atomic(stored, found)
    return found


def _eval_plan(task: str, source: EncoderSource, train: str, test: str, settings: CompareSettings):
    """(result name, check(result) that a finished one is exactly this eval, run() -> (path, payload))."""
    from vitpipe.downstream import evaluate
    from vitpipe.downstream.features import PIXELS, LayerKey, layer_names
    from vitpipe.downstream.finetune import finetune, result_name
    from vitpipe.downstream.probe import ProbeSettings

    limit = settings.max_contamination
    if task == "probe":
        layers = probe_layers(source, settings.layers)
        # exactly these layers: a sweep's best block must not stand in for the output, nor the reverse
        wanted = {PIXELS} if source.kind == "pixels" else set(layer_names(layers))
        concat = settings.concat and len(wanted) > 1
        return ("linear-probe",
                lambda r: (r["settings"]["epochs"] == settings.probe_epochs
                           and {n for n in r["per_layer"] if not LayerKey.parse(n).joined} == wanted
                           and any(LayerKey.parse(n).joined for n in r["per_layer"]) == concat),
                lambda: evaluate.eval_linear_probe(source, train, test, layers, None,
                                                   ProbeSettings(epochs=settings.probe_epochs), settings.workers,
                                                   concat, max_contamination=limit))
    if task == "knn":
        block = _probe_picked_block(source) if settings.knn_layer == "probe" else None
        wanted = (PIXELS,) if source.kind == "pixels" else (str(LayerKey(() if block is None else (block,))),)
        # exactly this k-NN: not one on another block or an approximate index
        return ("knn", lambda r: r.get("layer") in wanted and r.get("index", {}).get("kind") == "flat",
                lambda: evaluate.eval_knn(source, train, test, workers=settings.workers, layer=block,
                                          max_contamination=limit))
    overrides = [f"data.subset_fraction={settings.label_fraction}", *settings.finetune_overrides]
    return (result_name(settings.label_fraction),
            lambda r: r.get("overrides") == overrides and bool(r.get("probe_init")) == settings.finetune_probe_init,
            lambda: finetune(source, train, test, overrides, settings.finetune_probe_init, max_contamination=limit))


def _probe_picked_block(source: EncoderSource) -> int | None:
    """The single block with the best held-out probe accuracy in the source's finished probe (None:
    the output, or pixels)."""
    from vitpipe.downstream.evaluate import result_path
    from vitpipe.downstream.features import LayerKey

    if source.kind == "pixels":
        return None
    per_layer = json.loads(result_path(source, "linear-probe").read_text())["per_layer"]
    best = max((name for name in per_layer if not LayerKey.parse(name).joined), key=lambda n: per_layer[n]["val_top1"])
    return LayerKey.parse(best).block


def _written(outcome: tuple[Path, dict[str, Any]]) -> dict[str, Any]:
    """The result file an eval wrote (what a rerun reads back), not just its in-memory payload."""
    return json.loads(outcome[0].read_text())


def _summary(task: str, result: dict[str, Any]) -> dict[str, Any]:
    summary = {"top1": result["top1"], "seconds": result.get("seconds"), "test_samples": result.get("test_samples"),
               "train_samples": result.get("train_samples")}
    if task in ("probe", "knn"):
        summary["layer"] = result.get("layer")
    if task == "probe":
        summary["val_top1"] = result.get("val_top1")  # held out of train: picks a best encoder without the test split
        summary["per_layer"] = {name: r["top1"] for name, r in result.get("per_layer", {}).items() if "+" not in name}
    if task == "finetune":
        summary["label_fraction"] = result.get("label_fraction")
    return summary


def _encoder_facts(source: EncoderSource) -> dict[str, Any]:
    config = source.config
    from safetensors import safe_open

    with safe_open(str(source.weights), "pt") as handle:  # counted from the file: no model built
        params = sum(_numel(handle.get_slice(name).get_shape()) for name in handle.keys())
    return {"size": config.model.size, "embed_dim": config.model.embed_dim, "depth": source.depth(),
            "patch_size": config.model.patch_size, "image_size": config.data.image_size, "parameters": params}


def _numel(shape) -> int:
    total = 1
    for dim in shape:
        total *= int(dim)
    return total


class BaselineMemo:
    """Baselines that do not depend on the run are measured once per comparison: raw pixels under
    the same eval transform, and a random init whose weights (built, seeded), architecture and eval
    transform are the same (MAE's and CLIP's ViT-Ti of one seed: ~7 CPU-minutes of probe each).
    A fine-tune is never shared: its recipe comes from the run's own config."""

    def __init__(self) -> None:
        self.found: dict[tuple, dict[str, Any]] = {}
        self.random_weights: dict[Path, str] = {}

    def key(self, task: str, source: EncoderSource) -> tuple | None:
        transform = astuple(TransformSpec.for_eval(source.config.data))
        if source.kind == "pixels":
            return task, "pixels", transform
        if source.kind == "random" and task != "finetune":
            if source.run not in self.random_weights:
                self.random_weights[source.run] = _weights_digest(source.build())
            model = json.dumps(to_dict(source.config)["model"], sort_keys=True)
            return task, "random", self.random_weights[source.run], model, transform, source.resolved().precision
        return None

    def get(self, task: str, source: EncoderSource) -> dict[str, Any] | None:
        key = self.key(task, source)
        return None if key is None else self.found.get(key)

    def put(self, task: str, source: EncoderSource, summary: dict[str, Any], run_name: str) -> None:
        key = self.key(task, source)
        if key is not None:
            self.found[key] = {**summary, "same_as": run_name}


def _weights_digest(module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def compare(runs: list[Path], train: str, test: str, out: Path, settings: CompareSettings = CompareSettings(),
            log=print) -> dict[str, Any]:
    """Run (or read back) the suite for every run and baseline; write OUT/compare.json and return
    it (the page is the caller's: ``report.compare_page.write_page``)."""
    from vitpipe.downstream.contamination import Contamination, fields as _fields
    from vitpipe.downstream.cost import pretraining_cost
    from vitpipe.downstream.evaluate import checked_contamination
    from vitpipe.downstream.featurestore import Processes

    if Processes.from_env().world > 1:
        raise ConfigError("vitpipe compare runs on one process (its features can be extracted first on many: "
                          "torchrun ... -m vitpipe eval knn RUN --train ... --test ...)")
    if len({RunLayout.of(r).root.resolve() for r in runs}) < len(runs):
        raise ConfigError("a run is named twice")
    warnings = check_data(runs, test)
    for line in warnings:
        print(line, file=sys.stderr)
    leaks = {}  # every run's figure before any eval runs: a refused run costs no one's time
    for run in runs:
        leaks[str(run)] = checked_contamination(EncoderSource.resolve(run, "trained"), test, settings.max_contamination,
                                                train=train)
        log(f"compare: {RunLayout.of(run).root.name}: contamination: {Contamination(**_fields(leaks[str(run)])).line()}")
    shared = BaselineMemo()
    rows = []
    for run in runs:
        trained = EncoderSource.resolve(run, "trained").with_precision(settings.precision)
        row = {"run": str(run), "name": RunLayout.of(run).root.name, "objective": trained.config.objective,
               "encoder": _encoder_facts(trained), "cost": pretraining_cost(run), "evals": {},
               "contamination": leaks[str(run)], "precision": trained.precision}
        report = RunLayout.of(run).report / "index.html"
        row["report"] = os.path.relpath(report, out) if report.is_file() else None
        for task in (task for task in SUITE if task in settings.suite):  # the probe first: --knn-layer probe reads it
            row["evals"][task] = {}
            for kind in BASELINES:
                if task == "finetune" and kind == "pixels":
                    continue
                source = trained if kind == "trained" else EncoderSource.resolve(run, kind).with_precision(trained.precision)
                found = shared.get(task, source)
                if found is not None:
                    log(f"compare: {row['name']}: {task} ({kind}): the same {kind} features as {found['same_as']}'s")
                else:
                    log(f"compare: {row['name']}: {task} ({kind})")
                    found = run_eval(task, source, train, test, settings)
                    shared.put(task, source, found, row["name"])
                row["evals"][task][kind] = found
            scores = row["evals"][task]
            scores["delta_vs_random"] = scores["trained"]["top1"] - scores["random"]["top1"]
        rows.append(row)
    first = next(iter(rows[0]["evals"].values()))["trained"]
    result = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "train": train, "test": test,
              "test_samples": first["test_samples"], "train_samples": first.get("train_samples"),
              "settings": asdict(settings), "warnings": warnings, "runs": rows}
    write_json_atomic(out / "compare.json", result)
    return result
