"""The engine's contracts with objectives: the trainable module alone is compiled and wrapped (a
teacher stays out), the optimizer follows freezing and unfreezing during a run (on one process and
under DDP), and constants are buffers, never optimizer state."""

from __future__ import annotations

import json

import pytest
import torch

from test_dino import RUN as DINO_RUN
from test_trainer import RUN_ARGS, tiny_config
from vitpipe.cli import main
from vitpipe.ssl import registry
from vitpipe.ssl.objectives.mae.objective import MAE
from vitpipe.ssl.engine.trainer import Trainer


class Unfreezing(MAE):
    """MAE whose pixel head starts frozen and is unfrozen after step 2, while the first encoder
    block is frozen from then on; records both after every step."""

    seen: list[tuple[torch.Tensor, torch.Tensor]]

    def on_step_end(self, step: int, max_steps: int) -> None:
        self.seen.append((self.decoder_pred.weight.detach().clone(), self.backbone.blocks[0].mlp.fc1.weight.detach().clone()))
        if step == 2:
            self.decoder_pred.requires_grad_(True)
            self.backbone.blocks[0].requires_grad_(False)


def test_parameters_unfrozen_mid_run_train_and_frozen_ones_stay_put(tiny_shards, tmp_path):
    built: list[Unfreezing] = []

    def build(config, artifacts):
        objective = registry.build_objective(config, artifacts)
        objective.__class__ = Unfreezing
        objective.seen = []
        objective.decoder_pred.requires_grad_(False)
        built.append(objective)
        return objective

    config = tiny_config(tiny_shards, "train.max_steps=4", "optim.weight_decay=0.5", "optim.warmup_steps=1")
    initial_head = None

    def record_initial(config, artifacts):
        nonlocal initial_head
        objective = build(config, artifacts)
        initial_head = objective.decoder_pred.weight.detach().clone()
        return objective

    Trainer(config, tmp_path / "run", build_objective=record_initial, progress=False).run()
    seen = built[-1].seen  # (precision=auto may build one to measure first)
    assert len(seen) == 4
    assert torch.equal(seen[0][0], initial_head) and torch.equal(seen[1][0], initial_head)  # frozen: not even decayed
    assert not torch.equal(seen[2][0], seen[1][0]) and not torch.equal(seen[3][0], seen[2][0])  # unfrozen: trains
    assert not torch.equal(seen[1][1], seen[0][1])  # the block trains while trainable ...
    assert torch.equal(seen[3][1], seen[1][1])  # ... and is neither updated nor decayed once frozen


def test_constants_are_buffers_not_optimizer_state(tiny_shards):
    config = tiny_config(tiny_shards)
    objective = registry.build_objective(config, {})
    names = {name for name, _ in objective.named_parameters()}
    assert "decoder_pos_embed" not in names and "backbone.pos_embed" not in names  # sin-cos tables
    assert "decoder_pos_embed" in objective.state_dict() and "backbone.pos_embed" in objective.state_dict()
    learned = registry.build_objective(tiny_config(tiny_shards, "model.pos_embed=learned"), {})
    assert "backbone.pos_embed" in {name for name, _ in learned.named_parameters()}


@pytest.mark.parametrize("name", ["dino", "jepa"])
def test_teacher_stays_outside_compile_and_the_optimizer(name, monkeypatch, labelled_shards, tmp_path):
    """compile (and DDP, through the same prepare) gets the student alone; the optimizer holds no
    teacher parameter; a compiled session's checkpoint resumes uncompiled."""
    compiled: list[torch.nn.Module] = []
    real_compile = torch.compile
    # what is checked here (what compile wraps, what the optimizer holds, a compiled session's
    # checkpoint resumed eagerly) is the same on every backend; inductor's C++ codegen cost ~25-50 s
    # a case. tests/test_trainer.py's compiled run keeps inductor.
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module)
                        or real_compile(module, **{**kw, "backend": "aot_eager"}))
    run = tmp_path / "run"
    small = DINO_RUN if name == "dino" else [*RUN_ARGS[:1], "data.image_size=16", "model.patch_size=4",
                                               "train.batch_size=8", "data.num_workers=0"]
    args = ["pretrain", name, "--data", str(labelled_shards / "train"), "--out", str(run), *small]
    assert main([*args, "train.max_steps=2", "train.compile=true", "train.ckpt_every_steps=1"]) == 0
    assert len(compiled) == 1 and type(compiled[0]).__name__ == "Student"
    from vitpipe.ssl.runs import load_run_objective, locate_run

    objective = load_run_objective(run)
    teacher = objective.encoder()
    student_ids = {id(p) for p in objective.trainable_module().parameters()}
    assert not student_ids & {id(p) for p in teacher.parameters()}
    from vitpipe.ssl.engine import optim

    optimizer, *_ = optim.build(objective, locate_run(run)[0], 8)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == student_ids
    assert main([*args, "train.max_steps=3", "--resume", "auto"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3


def _late_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from vitpipe.ssl.engine.distributed import average_late_gradients

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    module[1].requires_grad_(False)
    synced = {id(p) for p in module.parameters() if p.requires_grad}
    wrapped = DistributedDataParallel(module)
    module[1].requires_grad_(True)  # unfrozen after DDP registered its parameters
    x = torch.full((2, 3), float(rank + 1))
    wrapped(x).sum().backward()
    average_late_gradients(module, synced)
    torch.save([p.grad for p in module.parameters()], f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_parameters_unfrozen_after_ddp_wrapped_are_averaged(tmp_path):
    """DDP registers only the parameters trainable when it wraps: one unfrozen later would train on
    each process's own gradient (the ranks drift apart) unless the engine averages it."""
    import torch.multiprocessing as mp

    mp.spawn(_late_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    grads = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for a, b in zip(*grads):
        assert torch.allclose(a, b)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    for rank in range(2):
        module(torch.full((2, 3), float(rank + 1))).sum().mul(0.5).backward()
    for got, expected in zip(grads[0], [p.grad for p in module.parameters()]):
        assert torch.allclose(got, expected, atol=1e-6)


def _as_written_before_frozen_joined(checkpoint, objective) -> dict:
    """Rewrite ``checkpoint``'s optimizer.pt as vitpipe wrote it before frozen parameters joined the
    groups (only those trainable at build time, numbered in order), with its checksum; return it."""
    from vitpipe.ssl.engine import checkpoints, optim

    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    groups = optim.param_groups(objective, 0.0, 1.0)
    state, old_groups, start = {}, [], 0
    for saved_group, group in zip(saved["param_groups"], groups):
        live = [saved_id for saved_id, param in zip(saved_group["params"], group["params"]) if param.requires_grad]
        ids = list(range(start, start + len(live)))
        state.update({new: saved["state"][old] for new, old in zip(ids, live) if old in saved["state"]})
        old_groups.append({**saved_group, "params": ids})
        start += len(ids)
    old = {"state": state, "param_groups": old_groups}
    torch.save(old, checkpoint / "optimizer.pt")
    sums = json.loads((checkpoint / "checksums.json").read_text())
    sums["optimizer.pt"] = checkpoints.sha256_file(checkpoint / "optimizer.pt")
    (checkpoint / "checksums.json").write_text(json.dumps(sums))
    assert checkpoints.verify(checkpoint) is None
    return old


def test_a_checkpoint_from_before_frozen_parameters_joined_the_optimizer_resumes(labelled_shards, tmp_path):
    """A run with frozen blocks checkpointed by the older optimizer layout resumes, its Adam moments
    carried to the same parameters (they used to fail with a group size mismatch)."""
    from vitpipe.ssl.engine import optim
    from vitpipe.ssl.runs import load_run_objective, locate_run

    run = tmp_path / "run"
    args = ["pretrain", "classify", "--data", str(labelled_shards / "train"), "--out", str(run), *RUN_ARGS[:1],
            "data.image_size=16", "model.patch_size=4", "train.batch_size=8", "data.num_workers=0",
            "finetune.num_classes=2", "finetune.freeze_blocks=1", "train.ckpt_every_steps=1"]
    assert main([*args, "train.max_steps=2"]) == 0
    objective = load_run_objective(run)
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    old = _as_written_before_frozen_joined(checkpoint, objective)
    optimizer, *_ = optim.build(objective, locate_run(run)[0], 8)
    assert all(group["fused"] for group in optimizer.param_groups)  # torch's fused kernel, not its per-parameter loop
    assert sum(len(g["params"]) for g in old["param_groups"]) < sum(len(g["params"]) for g in optimizer.param_groups)
    optimizer.load_state_dict(optim.with_frozen(old, optimizer))
    first_live = next(p for p in optimizer.param_groups[0]["params"] if p.requires_grad)
    assert torch.equal(optimizer.state[first_live]["exp_avg"], old["state"][0]["exp_avg"])
    assert not any(optimizer.state.get(p) for g in optimizer.param_groups for p in g["params"] if not p.requires_grad)
    assert main([*args, "train.max_steps=3", "--resume", "auto"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert steps[-1] == 3
