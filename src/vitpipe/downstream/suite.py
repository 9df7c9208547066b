"""`vitpipe eval suite SUITE.yaml RUN ...`: many datasets, several evals on each, every run beside
its random init (and raw pixels where features are compared), one table with the average over
datasets and each dataset's contamination against each run's pretraining data.

Each eval is the `vitpipe eval` one; its result is kept per dataset in OUT/results/DATASET/RUN/
(RUN/eval/ holds only the latest of each task), and a finished one of the same data, encoder and
settings is read back, so a rerun of a suite costs only what changed. This module returns data;
the CLI writes the page.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from vitpipe.runlayout import RunLayout
from vitpipe.config import ConfigError
from vitpipe.downstream.compare import BaselineMemo, CompareSettings, eval_result, read_back_or_run
from vitpipe.downstream.features import EncoderSource
from vitpipe.atomic import write_json_atomic
from vitpipe.pipeline.shardset import label_remap
from vitpipe.ssl import registry

EVALS = ("linear-probe", "knn", "zero-shot", "retrieval")
HEADLINE = {"linear-probe": "top-1", "knn": "top-1", "zero-shot": "top-1",
            "retrieval": "mean of image->text and text->image recall@1"}
FEATURE_EVALS = {"linear-probe": "probe", "knn": "knn"}  # compare's names for them
KEYS = {"name", "train", "test", "evals", "classes", "templates"}


@dataclass
class SuiteDataset:
    name: str
    """Row label; names a folder under OUT/results/."""
    test: str
    """Test shards (labelled for linear-probe, knn and zero-shot; captioned for retrieval)."""
    evals: tuple[str, ...]
    """Any of linear-probe, knn, zero-shot, retrieval."""
    train: str = ""
    """Labelled training shards of linear-probe and knn."""
    classes: str = ""
    """zero-shot: class names, one per line in label order (default: the test manifest's label map)."""
    templates: str = ""
    """zero-shot: prompt templates with {} (default: vitpipe's ensemble)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.evals) - set(EVALS))
        if unknown or not self.evals:
            raise ConfigError(f"suite dataset {self.name!r}: evals take {', '.join(EVALS)}; got "
                              f"{', '.join(unknown) or 'nothing'}")
        if not self.train and set(self.evals) & set(FEATURE_EVALS):
            raise ConfigError(f"suite dataset {self.name!r}: linear-probe and knn need train shards")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"suite dataset name {self.name!r} must be a plain folder name")


def load_suite(path: Path) -> list[SuiteDataset]:
    """The datasets of a suite file; relative paths are taken from the file's folder."""
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: not a readable suite file ({err.__class__.__name__})") from None
    rows = spec.get("datasets") if isinstance(spec, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"{path}: needs a non-empty 'datasets:' list")
    base, datasets = Path(path).resolve().parent, []
    for row in rows:
        if not isinstance(row, dict) or "name" not in row or "test" not in row:
            raise ConfigError(f"{path}: every dataset needs a name and test shards; got {row!r}")
        extra = sorted(set(row) - KEYS)
        if extra:
            raise ConfigError(f"{path}: dataset {row['name']!r} has unknown key(s) {', '.join(extra)}")
        local = {k: _local(base, str(row[k])) if row.get(k) else "" for k in ("train", "test", "classes", "templates")}
        evals = row.get("evals", ["linear-probe", "knn"])
        datasets.append(SuiteDataset(str(row["name"]), local["test"], tuple(evals if isinstance(evals, list) else [evals]),
                                     local["train"], local["classes"], local["templates"]))
    names = [d.name for d in datasets]
    if len(set(names)) < len(names):
        raise ConfigError(f"{path}: dataset names repeat ({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
    return datasets


def _local(base: Path, spec: str) -> str:
    """A path relative to the suite file's folder; URLs and absolute paths unchanged."""
    return spec if "://" in spec or Path(spec).is_absolute() else str(base / spec)


@dataclass
class SuiteSettings:
    compare: CompareSettings = field(default_factory=lambda: CompareSettings(suite=("probe", "knn")))
    """Probe epochs, layers, workers, precision and the contamination limit, as `vitpipe compare`."""
    max_skipped: float = 0.01
    """Largest fraction of unreadable samples an eval accepts."""


def run_suite(datasets: list[SuiteDataset], runs: list[Path], out: Path, settings: SuiteSettings = SuiteSettings(),
              log=print) -> dict[str, Any]:
    """Every eval of every dataset for every run (and its baselines); writes OUT/suite.json."""
    from vitpipe.downstream.featurestore import Processes

    if Processes.from_env().world > 1:
        raise ConfigError("vitpipe eval suite runs on one process (extract features first on many: "
                          "torchrun ... -m vitpipe eval knn RUN --train ... --test ...)")
    names = [RunLayout.of(r).root.name for r in runs]
    if len({RunLayout.of(r).root.resolve() for r in runs}) < len(runs) or len(set(names)) < len(names):
        raise ConfigError("two runs have the same name (the suite's table and result folders are keyed by it)")
    for run in runs:
        registry.run_config(RunLayout.of(run).config)  # a directory that is not a run: one line, before any work
    for dataset in datasets:  # a test class the train set lacks: refused before any dataset's work
        if set(dataset.evals) & set(FEATURE_EVALS):
            label_remap(dataset.train, dataset.test)
    rows = []
    for dataset in datasets:
        memo = BaselineMemo()  # random init and pixels are shared between runs, per dataset
        cells = {name: _dataset_run(dataset, run, name, out, settings, memo, log) for run, name in zip(runs, names)}
        rows.append({"dataset": asdict(dataset), "runs": cells})
    result = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": names,
              "run_paths": [str(r) for r in runs], "objectives": {n: _objective(r) for r, n in zip(runs, names)},
              "evals": [e for e in EVALS if any(e in d.evals for d in datasets)], "headline": HEADLINE,
              "settings": asdict(settings), "datasets": rows, "average": averages(rows, names)}
    write_json_atomic(Path(out) / "suite.json", result)
    return result


def _objective(run: Path) -> str:
    return registry.run_config(RunLayout.of(run).config).objective


def _dataset_run(dataset: SuiteDataset, run: Path, name: str, out: Path, settings: SuiteSettings, memo: BaselineMemo,
                 log) -> dict[str, Any]:
    """One cell of the table: the dataset's contamination against the run's pretraining data (and
    its own train shards), then each eval beside the baselines; a contaminated cell is refused."""
    from vitpipe.downstream.contamination import Contamination, fields
    from vitpipe.downstream.evaluate import checked_contamination

    limit = settings.compare.max_contamination
    trained = EncoderSource.resolve(run, "trained").with_precision(settings.compare.precision)
    leaks = checked_contamination(trained, dataset.test, 1.0, **({"train": dataset.train} if dataset.train else {}))
    log(f"suite: {dataset.name}: {name}: contamination: {Contamination(**fields(leaks)).line()}")
    cell: dict[str, Any] = {"contamination": leaks, "evals": {}}
    if leaks["fraction"] > limit:
        cell["refused"] = (f"{100 * leaks['fraction']:.2f}% of the test images have a near-copy in the run's "
                           f"pretraining data or the train shards (above --max-contamination {limit})")
        log(f"suite: {dataset.name}: {name}: refused: {cell['refused']}")
        return cell
    for task in dataset.evals:
        reason = _not_applicable(task, trained)
        if reason:
            cell["evals"][task] = {"skipped": reason}
            continue
        scores = {}
        for kind in ("trained", "random", "pixels") if task in FEATURE_EVALS else ("trained", "random"):
            source = trained if kind == "trained" else EncoderSource.resolve(run, kind).with_precision(trained.precision)
            stored = Path(out) / "results" / dataset.name / name / f"{task}{source.baseline_suffix}.json"
            log(f"suite: {dataset.name}: {name}: {task} ({kind})")
            scores[kind] = _score(task, source, dataset, settings, stored, memo, name)
        scores["delta_vs_random"] = scores["trained"]["score"] - scores["random"]["score"]
        cell["evals"][task] = scores
    return cell


def _not_applicable(task: str, source: EncoderSource) -> str:
    if task in ("zero-shot", "retrieval") and registry.get(source.config.objective).towers != ("image", "text"):
        return f"{task} needs an image-text run; this is {source.config.objective}"
    return ""


def _score(task: str, source: EncoderSource, dataset: SuiteDataset, settings: SuiteSettings, stored: Path,
           memo: BaselineMemo, run_name: str) -> dict[str, Any]:
    """{"score": the headline number, ...the eval's own figures}: read back or run."""
    if task in FEATURE_EVALS:
        found = memo.get(FEATURE_EVALS[task], source)
        if found is not None:
            return found
        result = eval_result(FEATURE_EVALS[task], source, dataset.train, dataset.test, settings.compare, stored)
        summary = {"score": result["top1"], "top1": result["top1"], "layer": result.get("layer"),
                   "test_samples": result.get("test_samples"), "seconds": result.get("seconds")}
        memo.put(FEATURE_EVALS[task], source, summary, run_name)
        return summary
    if task == "zero-shot":
        result = _zero_shot(source, dataset, settings, stored)
        return {"score": result["top1"], "top1": result["top1"], "top5": result["top5"], "chance": result["chance"],
                "test_samples": result["test_samples"], "seconds": result.get("seconds")}
    result = _retrieval(source, dataset, settings, stored)
    i2t, t2i = result["image_to_text"], result["text_to_image"]
    return {"score": (i2t["1"] + t2i["1"]) / 2, "image_to_text": i2t, "text_to_image": t2i, "pairs": result["size"],
            "seconds": result.get("seconds")}


def _zero_shot(source: EncoderSource, dataset: SuiteDataset, settings: SuiteSettings, stored: Path) -> dict[str, Any]:
    from vitpipe.downstream.imagetext import class_names, eval_zero_shot, read_templates

    classes, templates = Path(dataset.classes) if dataset.classes else None, Path(dataset.templates) if dataset.templates else None
    names, prompts = class_names(dataset.test, classes), read_templates(templates)
    return read_back_or_run(source, {"test": dataset.test},
                            lambda r: r.get("classes") == names and r.get("templates") == prompts,
                            lambda: eval_zero_shot(source, dataset.test, classes, templates, settings.compare.workers,
                                                   settings.max_skipped, settings.compare.max_contamination), stored)


def _retrieval(source: EncoderSource, dataset: SuiteDataset, settings: SuiteSettings, stored: Path) -> dict[str, Any]:
    from vitpipe.downstream.imagetext import eval_text_retrieval

    return read_back_or_run(source, {"index": dataset.test}, lambda r: True,
                            lambda: eval_text_retrieval(source, dataset.test, settings.compare.workers,
                                                        settings.max_skipped), stored)


def averages(rows: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """run -> eval -> kind -> mean headline score over the datasets where it ran (and how many)."""
    table: dict[str, Any] = {}
    for name in names:
        per_eval: dict[str, Any] = {}
        for row in rows:
            for task, scores in row["runs"][name]["evals"].items():
                for kind, summary in scores.items():
                    if isinstance(summary, dict) and "score" in summary:
                        per_eval.setdefault(task, {}).setdefault(kind, []).append(summary["score"])
        table[name] = {task: {kind: {"mean": sum(v) / len(v), "datasets": len(v)} for kind, v in kinds.items()}
                       for task, kinds in per_eval.items()}
    return table


def with_compare(settings: SuiteSettings, **changes: Any) -> SuiteSettings:
    """The settings with some of `vitpipe compare`'s changed (probe epochs, workers, precision...)."""
    return replace(settings, compare=replace(settings.compare, **changes))
