"""Objectives register through the ``vitpipe.objectives`` entry-point group: a package that declares
one (written here as an installed package is: a module beside its .dist-info with entry_points.txt)
is trained by `vitpipe pretrain NAME` and evaluated by `vitpipe eval knn`, with no change to
vitpipe; a broken plugin is one warning line and every other command still works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from test_trainer import RUN_ARGS

PLUGIN = textwrap.dedent('''
    """A third-party objective: predict each image's mean colour from the pooled ViT features."""
    import torch
    from vitpipe.ssl.objective import Objective, ObjectiveSpec, Output
    from vitpipe.ssl.vit import VisionTransformer


    class MeanColour(Objective):
        def __init__(self, config):
            super().__init__()
            self.backbone = VisionTransformer(config.model, config.data.image_size, config.data.channels)
            self.head = torch.nn.Linear(self.backbone.embed_dim, config.data.channels)

        def encoder(self):
            return self.backbone

        def forward(self, batch):
            images = batch["image"]
            return Output(torch.nn.functional.mse_loss(self.head(self.backbone(images)), images.mean(dim=(2, 3))))


    SPEC = ObjectiveSpec(name="meancolour", build=lambda config, artifacts: MeanColour(config),
                         summary="toy plugin: the mean colour from pooled features")
''')


def install(site, module: str, source: str, points: str) -> None:
    """What pip leaves in site-packages: the module and a dist-info whose entry_points.txt names it."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{module}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[vitpipe.objectives]\n{points}\n")


def vitpipe(site, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "vitpipe", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_an_installed_package_adds_an_objective(labelled_shards, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    install(site, "vitpipe_meancolour", PLUGIN, "meancolour = vitpipe_meancolour:SPEC")
    install(site, "vitpipe_broken", "raise ImportError('missing dependency')\n", "broken = vitpipe_broken:SPEC")
    install(site, "vitpipe_squatter", PLUGIN, "mae = vitpipe_squatter:SPEC")
    listed = vitpipe(site, "pretrain", "nosuch", "--out", str(tmp_path / "x"))
    available = listed.stderr.split("available: ")[-1].strip().split(", ")
    assert listed.returncode == 2 and {"mae", "clip", "meancolour"} <= set(available) and "broken" not in available
    run = tmp_path / "run"
    args = [a for a in RUN_ARGS if not a.startswith("mae.")]
    trained = vitpipe(site, "pretrain", "meancolour", "--data", str(labelled_shards / "train"), "--out", str(run),
                      *args, "train.max_steps=3")
    assert trained.returncode == 0, trained.stderr
    warnings = [line for line in trained.stderr.splitlines() if line.startswith("warning: objective plugin")]
    assert len(warnings) == 2 and "'broken' could not be loaded (ImportError" in warnings[0] + warnings[1]
    assert any("takes a built-in name" in w for w in warnings)
    assert json.loads((run / "run.json").read_text())["objective"] == "meancolour"
    knn = vitpipe(site, "eval", "knn", str(run), "--train", str(labelled_shards / "train"), "--test",
                  str(labelled_shards / "val"), "--workers", "0", "--max-contamination", "1")
    assert knn.returncode == 0, knn.stderr
    assert 0 <= json.loads((run / "eval" / "knn.json").read_text())["top1"] <= 1
    # without the package installed, its run is one clear line, not a traceback
    orphan = vitpipe(tmp_path / "nothing", "eval", "knn", str(run), "--train", str(labelled_shards / "train"),
                     "--test", str(labelled_shards / "val"))
    assert orphan.returncode == 2 and "unknown objective 'meancolour'" in orphan.stderr
