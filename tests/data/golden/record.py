"""How the golden MAE run was recorded (run once, before the objective-platform refactor):

    python tests/data/golden/record.py

Writes shards/ (32 generated 16 px images through `vitpipe ingest`) and mae_losses.json (the
per-step losses of a 12-step seeded CPU run). tests/test_golden.py replays the run and compares.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    sys.path.insert(0, str(HERE.parent.parent))
    from conftest import write_image_folder
    from test_golden import ARGS
    from vitpipe.cli import main as vitpipe

    if not (HERE / "shards").exists():
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_image_folder(Path(tmp) / "imgs", per_class=16, classes=("a", "b"))
            assert vitpipe(["ingest", str(folder), "--out", str(HERE / "shards"), "--shard-size", "10",
                            "--image-size", "16"]) == 0
    with tempfile.TemporaryDirectory() as tmp:
        assert vitpipe(["pretrain", "mae", "--data", str(HERE / "shards"), "--out", f"{tmp}/run", *ARGS]) == 0
        (HERE / "mae_losses.json").write_text(json.dumps(losses(Path(tmp) / "run"), indent=1) + "\n")


if __name__ == "__main__":
    main()
