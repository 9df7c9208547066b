"""The one place that knows where things live in a run directory (every command reads and writes
through it; nothing else spells these names):

    RUN/config.yaml        the resolved config          RUN/run.json          bookkeeping, checksums
    RUN/metrics.jsonl      one line per logged step     RUN/encoder.safetensors  the kept encoder
    RUN/checkpoints/step_N/  training state             RUN/artifacts/        fitted files (tokenizer, palette)
    RUN/eval/NAME.json     eval results (+ baselines)   RUN/eval/cache/       features, fingerprints
    RUN/report/            the report                   RUN/audit/            per-rank sample keys
    RUN/finetune/          fine-tuned models
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of(cls, run_or_checkpoint: str | Path) -> "RunLayout":
        """The run a path names: the run directory itself or one of its checkpoints."""
        path = Path(run_or_checkpoint)
        return cls(path.parent.parent if (path / "state.json").is_file() else path)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def info(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def encoder(self) -> Path:
        return self.root / "encoder.safetensors"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def cache(self) -> Path:
        return self.eval / "cache"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def finetune(self) -> Path:
        return self.root / "finetune"

    @property
    def audit(self) -> Path:
        return self.root / "audit"

    def result(self, name: str) -> Path:
        """RUN/eval/NAME.json (NAME carries a baseline's suffix, e.g. ``knn-random``)."""
        return self.eval / f"{name}.json"

    def results(self) -> list[Path]:
        """Every eval result file, sorted by name."""
        return sorted(self.eval.glob("*.json")) if self.eval.is_dir() else []
