"""One module knows the run directory's layout (vitpipe.runlayout): no other module spells its names."""

from __future__ import annotations

import re
from pathlib import Path

from vitpipe.runlayout import RunLayout

SOURCE = Path(__file__).resolve().parents[1] / "src" / "vitpipe"
NAMES = re.compile(r'"(config\.yaml|run\.json|metrics\.jsonl|encoder\.safetensors)"|/ "(eval|report|checkpoints|audit)"')


def test_no_module_but_runlayout_spells_the_run_directory():
    offenders = [f"{path.relative_to(SOURCE)}:{number}: {line.strip()}"
                 for path in sorted(SOURCE.rglob("*.py")) if path.name != "runlayout.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if NAMES.search(line) and not line.lstrip().startswith(("#", '"""'))]
    assert not offenders, "\n".join(offenders)


def test_a_checkpoint_names_its_run(tmp_path):
    run = tmp_path / "run"
    checkpoint = RunLayout(run).checkpoints / "step_00000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text("{}")
    assert RunLayout.of(checkpoint).root == run and RunLayout.of(run).root == run
    assert RunLayout.of(str(checkpoint)).result("knn-random") == run / "eval" / "knn-random.json"
    assert RunLayout(run).cache == run / "eval" / "cache" and RunLayout(run).results() == []
