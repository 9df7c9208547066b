"""Two more objectives a user would add, each a third-party package written to a temporary folder
and registered only through its entry point: a SimCLR toy (its own two-view recipe, NT-Xent over
the global batch through vitpipe's gather_with_grad) and a teacher-student toy (an EMA teacher from
vitpipe's helper, a head frozen at first through ``after_backward``, the teacher evaluated).
Each is trained by the real CLI, then scored by `vitpipe eval knn` and `vitpipe compare`; nothing
of vitpipe changes."""

from __future__ import annotations

import json
import textwrap

import pytest

from test_objective_plugins import install, vitpipe
from test_trainer import RUN_ARGS

SIMCLR = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torchvision.transforms import v2
    from vitpipe.pipeline.transforms import MultiView
    from vitpipe.ssl.engine.distributed import gather_with_grad
    from vitpipe.ssl.objective import Objective, ObjectiveSpec, Output
    from vitpipe.ssl.vit import VisionTransformer


    def view(data):
        return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(data.image_size, scale=(0.3, 1.0), antialias=True),
                           v2.RandomHorizontalFlip(), v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                           v2.ToDtype(torch.float32, scale=True), v2.Normalize(data.mean, data.std)])


    class SimCLR(Objective):
        def __init__(self, config):
            super().__init__()
            self.backbone = VisionTransformer(config.model, config.data.image_size, config.data.channels)
            self.projector = torch.nn.Sequential(torch.nn.Linear(self.backbone.embed_dim, 64), torch.nn.ReLU(),
                                                 torch.nn.Linear(64, 32))

        def encoder(self):
            return self.backbone

        def views(self, data):
            return MultiView([view(data), view(data)])

        def forward(self, batch):
            first, second = batch["image"]
            z = [gather_with_grad(F.normalize(self.projector(self.backbone(x)), dim=-1)) for x in (first, second)]
            z = torch.cat(z)
            logits = z @ z.T / 0.2
            logits.fill_diagonal_(float("-inf"))
            n = len(z) // 2
            targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
            return Output(F.cross_entropy(logits, targets))


    SPEC = ObjectiveSpec(name="simclr", build=lambda config, artifacts: SimCLR(config), summary="SimCLR toy")
''')

TEACHER_STUDENT = textwrap.dedent('''
    import copy
    import torch
    import torch.nn.functional as F
    from vitpipe.ssl.engine.ema import ema_update
    from vitpipe.ssl.objective import Objective, ObjectiveSpec, Output
    from vitpipe.ssl.vit import VisionTransformer


    class TeacherStudent(Objective):
        """The student's projection of a noisy image regresses the EMA teacher's of the clean one."""

        def __init__(self, config):
            super().__init__()
            self.backbone = VisionTransformer(config.model, config.data.image_size, config.data.channels)
            self.head = torch.nn.Linear(self.backbone.embed_dim, 16)
            self.teacher = copy.deepcopy(self.backbone).requires_grad_(False)
            self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)

        def encoder(self):
            return self.teacher

        def forward(self, batch):
            images = batch["image"]
            with torch.no_grad():
                target = F.normalize(self.teacher_head(self.teacher.eval()(images)), dim=-1)
            noisy = images + 0.3 * torch.randn_like(images)
            return Output(2 - 2 * (F.normalize(self.head(self.backbone(noisy)), dim=-1) * target).sum(-1).mean())

        def after_backward(self, step, max_steps):
            if step <= 2:
                self.head.weight.grad = None

        @torch.no_grad()
        def on_step_end(self, step, max_steps):
            ema_update(self.teacher, self.backbone, 0.99)
            ema_update(self.teacher_head, self.head, 0.99)


    SPEC = ObjectiveSpec(name="teacherstudent", build=lambda config, artifacts: TeacherStudent(config),
                         summary="teacher-student toy")
''')


@pytest.mark.parametrize("name,source", [("simclr", SIMCLR), ("teacherstudent", TEACHER_STUDENT)])
def test_a_toy_objective_package_trains_and_is_compared(labelled_shards, tmp_path, name, source):
    site = tmp_path / "site"
    site.mkdir()
    install(site, f"vitpipe_{name}", source, f"{name} = vitpipe_{name}:SPEC")
    run = tmp_path / "run"
    args = [a for a in RUN_ARGS if not a.startswith("mae.")]
    trained = vitpipe(site, "pretrain", name, "--data", str(labelled_shards / "train"), "--out", str(run), *args,
                      "train.max_steps=4", "data.num_workers=1")
    assert trained.returncode == 0, trained.stderr
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 4 and all(loss == loss for loss in losses)  # finite, every step
    data = ["--train", str(labelled_shards / "train"), "--test", str(labelled_shards / "val")]
    knn = vitpipe(site, "eval", "knn", str(run), *data, "--workers", "0", "--max-contamination", "1")
    assert knn.returncode == 0, knn.stderr
    compared = vitpipe(site, "compare", str(run), *data, "--out", str(tmp_path / "cmp"), "--suite", "knn",
                       "--workers", "0", "--max-contamination", "1")
    assert compared.returncode == 0, compared.stderr
    row = json.loads((tmp_path / "cmp" / "compare.json").read_text())["runs"][0]
    assert row["objective"] == name and set(row["evals"]["knn"]) >= {"trained", "random", "pixels"}
