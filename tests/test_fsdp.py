"""train.fsdp: FSDP2 over two gloo CPU processes gives DDP's steps, keeps every checkpoint promise,
and exports the same encoder."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_clip import caption_shards  # noqa: F401  (a fixture)
from test_models import SMALL_SECTIONS, synthetic_read, through_views
from test_trainer import RUN_ARGS, losses

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vitpipe"]
ENV = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
STEPS = 3


def _plain_and_sharded(config, artifacts, rank: int) -> list:
    """(objective, optimizer, ids of parameters left whole) replicated as DDP starts it (each process
    builds it, the first's weights broadcast) and sharded as the trainer builds it
    (``sharding.build_sharded``: only the first process builds it whole, the others on meta)."""
    import torch.distributed as dist

    from vitpipe.ssl import registry
    from vitpipe.ssl.engine import optim, sharding
    from vitpipe.ssl.vit import set_grad_checkpointing

    def build(sharded: bool):
        torch.manual_seed(0 if sharded else rank)  # each process its own init: the broadcast must fix it
        objective = registry.build_objective(config, artifacts)
        built_on.append(next(objective.parameters()).device.type)
        set_grad_checkpointing(objective, sharded)  # the sharded side recomputes its blocks too
        return objective

    built_on = []
    plain = build(False)
    for tensor in plain.state_dict().values():
        dist.broadcast(tensor, src=0)
    sharded, whole = sharding.build_sharded(lambda: build(True), rank == 0, "cpu")
    assert sharding.is_sharded(sharded) and not sharding.is_sharded(plain)
    assert built_on[1] == ("cpu" if rank == 0 else "meta"), built_on  # only the first builds it whole
    return [(objective, optim.build(objective, config, 8)[0], ids) for objective, ids in ((plain, set()), (sharded, whole))]


def _objectives_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Per objective: a replicated copy whose gradients are all-reduced by hand (what DDP does) and
    a sharded copy, the same batches and seeds; per-step losses, gathered weights and the health
    monitor's features are saved for the test to compare."""
    import torch.distributed as dist

    from vitpipe.ssl import registry
    from vitpipe.ssl.engine import sharding

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results = {}
    for name in sorted(registry.OBJECTIVES):
        config = registry.pretrain_config(name, None, ["model.size=micro", "data.image_size=16", "model.patch_size=4",
                                                       "train.max_steps=10", *SMALL_SECTIONS.get(name, [])])
        spec = registry.get(name)
        artifacts = spec.fit_artifacts(config, synthetic_read) if spec.fit_artifacts else {}
        models = _plain_and_sharded(config, artifacts, rank)
        losses = [[], []]
        for step in range(1, STEPS + 1):
            generator = torch.Generator().manual_seed(100 * step + rank)  # each rank its own samples
            images = torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1
            raw = {"image": images, "label": torch.tensor([0, 1, 0, 1]), "text": ["a b", "c", "d e f", "g"],
                   "key": [f"{rank}-{step}-{i}" for i in range(4)]}
            for which, (objective, optimizer, whole) in enumerate(models):
                torch.manual_seed(step * 7 + rank)
                batch = through_views(objective, config.data, raw)
                hook = objective.batch_hook()
                if hook is not None:
                    batch = hook(batch, torch.Generator().manual_seed(step))
                loss = objective(batch).loss
                loss.backward()
                for param in objective.trainable_module().parameters():
                    if param.grad is not None and (which == 0 or id(param) in whole):  # DDP's mean
                        dist.all_reduce(param.grad)
                        param.grad.div_(2)
                objective.after_backward(step, 10)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                objective.on_step_end(step, 10)
                losses[which].append(loss.item())
        (plain, _, _), (sharded, _, _) = models
        with sharding.unsharded(sharded, sharded.trainable_module()), torch.no_grad():
            health = sharded.encoder().eval().forward_features(images)
        reloaded = registry.build_objective(config, artifacts)
        sharding.shard(reloaded, reloaded.trainable_module())
        sharding.load_model(reloaded, sharding.full_state_dict(plain))
        results[name] = {"losses": losses, "plain": {k: v.detach().clone() for k, v in plain.state_dict().items()},
                         "sharded": sharding.full_state_dict(sharded), "reloaded": sharding.full_state_dict(reloaded),
                         "encoder": sharding.full_state_dict(sharded.encoder()),
                         "health": health, "plain_health": plain.encoder().eval().forward_features(images).detach()}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_every_objective_shards_like_ddp(tmp_path):
    """Every registered objective (teachers, text towers, predictors included): sharded steps, with
    activation checkpointing on, give DDP's losses and weights to 1e-5, its encoder gathers whole
    for export, the health monitor reads it, and a consolidated state dict loads back into a sharded
    copy exactly."""
    import torch.multiprocessing as mp

    mp.spawn(_objectives_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name, result in ranks[0].items():
        plain_losses, sharded_losses = result["losses"]
        assert plain_losses == pytest.approx(sharded_losses, abs=1e-5), name
        assert result["plain"].keys() == result["sharded"].keys(), name
        for key, value in result["plain"].items():
            assert result["sharded"][key].shape == value.shape and result["sharded"][key].dtype == value.dtype
            assert torch.allclose(result["sharded"][key].float(), value.float(), atol=1e-5), (name, key)
            assert torch.equal(result["reloaded"][key], value), (name, key)
        assert torch.allclose(result["health"], result["plain_health"], atol=1e-5), name
        assert result["encoder"].keys() == ranks[1][name]["encoder"].keys(), name
        for key, value in result["encoder"].items():  # both processes gather the same whole tensors
            assert torch.equal(value, ranks[1][name]["encoder"][key]), (name, key)


def _pretrain(run, shards, *settings, options=(), launcher=TORCHRUN, steps=4, **popen):
    command = [*launcher, "pretrain", "mae", "--data", str(shards), "--out", str(run), *options, *RUN_ARGS,
               "data.image_size=8", "model.patch_size=2", f"train.max_steps={steps}", "train.ckpt_every_steps=2",
               "train.keep_checkpoints=3", "train.health_every=2", *settings]
    if popen:
        return subprocess.Popen(command, env=ENV, **popen)
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    return result


def _losses(run):
    """step -> loss, each step logged once (a resumed run must not log a step twice)."""
    logged = losses(run)
    assert all(len(values) == 1 for values in logged.values()), logged
    return {step: values[0] for step, values in sorted(logged.items())}


def _weights(path):
    from safetensors.torch import load_file

    return load_file(path)


def _same(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        assert torch.allclose(a[key], b[key], atol=atol), key


def test_fsdp_run_matches_ddp_resumes_and_refuses_another_world_size(tmp_path):
    from test_loader import write_shards

    from vitpipe.ssl.engine import checkpoints

    shards = write_shards(tmp_path / "shards", sizes=[12] * 6)
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    for run, flag in ((ddp, "false"), (fsdp, "true")):
        result = _pretrain(run, shards, f"train.fsdp={flag}")
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads((run / "run.json").read_text())["fsdp"] is (flag == "true")
    first = _losses(fsdp)
    assert sorted(first) == [1, 2, 3, 4] and list(first.values()) == pytest.approx(list(_losses(ddp).values()), abs=1e-5)
    encoder = _weights(fsdp / "encoder.safetensors")
    _same(encoder, _weights(ddp / "encoder.safetensors"), atol=1e-5)  # the export DDP writes
    last = fsdp / "checkpoints" / "step_00000004"
    assert checkpoints.verify(last) is None
    _same(_weights(last / "model.safetensors"), _weights(ddp / "checkpoints" / "step_00000004" / "model.safetensors"), 1e-5)
    saved = [torch.load(run / "checkpoints" / "step_00000004" / "optimizer.pt", weights_only=True) for run in (ddp, fsdp)]
    assert saved[0]["param_groups"] == saved[1]["param_groups"] and saved[0]["state"].keys() == saved[1]["state"].keys()

    # a crash after step 2's checkpoint: resumed sharded, then with DDP, it redoes steps 3-4 exactly
    for flag in ("true", "false"):
        import shutil

        shutil.rmtree(last)
        (fsdp / "encoder.safetensors").unlink()
        result = _pretrain(fsdp, shards, f"train.fsdp={flag}", options=["--resume", "auto"])
        assert result.returncode == 0, result.stderr[-3000:]
        assert list(_losses(fsdp).values()) == pytest.approx(list(first.values()), abs=1e-5)
        _same(_weights(fsdp / "encoder.safetensors"), encoder, atol=1e-5)

    # one process cannot continue a two-process run: its data position would not match
    result = _pretrain(fsdp, shards, "train.fsdp=true", "train.max_steps=6", options=["--resume", "auto"],
                       launcher=[sys.executable, "-m", "vitpipe"])
    assert result.returncode != 0 and "written by 2 processes" in result.stderr


def test_fsdp_run_killed_hard_resumes_sample_exact(tmp_path):
    """kill -9 of both processes and their loader workers while they train and checkpoint: the rerun
    resumes from the newest checkpoint that verifies and logs every step once, and it ends where an
    uninterrupted run does."""
    from test_loader import write_shards

    from vitpipe.ssl.engine import checkpoints

    shards = write_shards(tmp_path / "shards", sizes=[12] * 6)
    run, whole = tmp_path / "run", tmp_path / "whole"
    settings = ["train.fsdp=true", "train.ckpt_every_steps=3", "data.num_workers=2"]
    with open(tmp_path / "log", "w") as log:
        job = _pretrain(run, shards, *settings, steps=30, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 180
        while not (run / "checkpoints" / "step_00000009" / "state.json").exists() and time.monotonic() < deadline:
            assert job.poll() is None, (tmp_path / "log").read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert not (run / "encoder.safetensors").exists()
    result = _pretrain(run, shards, *settings, steps=30, options=["--resume", "auto"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoints.verify(checkpoints.list_checkpoints(run)[-1]) is None
    assert sorted(_losses(run)) == list(range(1, 31))
    result = _pretrain(whole, shards, *settings, steps=30)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(_losses(run).values()) == pytest.approx(list(_losses(whole).values()), abs=1e-5)
    _same(_weights(run / "encoder.safetensors"), _weights(whole / "encoder.safetensors"), atol=1e-5)


def test_fsdp_refuses_clip_with_accumulation(caption_shards, tmp_path):  # noqa: F811 (the fixture)
    """CLIP's accumulate() sums its micro-batches' gradients itself; sharding it is refused up front."""
    from test_clip import ARGS

    result = subprocess.run([*TORCHRUN, "pretrain", "clip", "--data", str(caption_shards / "train"), "--out",
                             str(tmp_path / "run"), *ARGS, "train.max_steps=2", "train.grad_accum=2", "train.fsdp=true"],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "train.fsdp with train.grad_accum > 1 is not supported for clip" in result.stderr


def test_fsdp_dino_exports_the_teacher_ddp_exports(tmp_path):
    """A teacher outside the trainable module: sharded, EMA-updated on slices, gathered for the
    health monitor and the export; the same losses and encoder.safetensors as a DDP run."""
    from test_loader import write_shards

    shards = write_shards(tmp_path / "shards", sizes=[12] * 6)
    args = [a for a in RUN_ARGS if not a.startswith("mae.")]
    dino = ["dino.local_crops=2", "dino.local_size=4", "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16"]
    runs = {}
    for flag in ("false", "true"):
        run = runs[flag] = tmp_path / f"fsdp-{flag}"
        result = subprocess.run([*TORCHRUN, "pretrain", "dino", "--data", str(shards), "--out", str(run), *args, *dino,
                                 "data.image_size=8", "model.patch_size=2", "train.max_steps=3", "train.health_every=1",
                                 f"train.fsdp={flag}"], env=ENV, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    ddp, fsdp = _losses(runs["false"]), _losses(runs["true"])
    assert sorted(fsdp) == [1, 2, 3] and list(fsdp.values()) == pytest.approx(list(ddp.values()), abs=1e-5)
    _same(_weights(runs["true"] / "encoder.safetensors"), _weights(runs["false"] / "encoder.safetensors"), atol=1e-5)
    health = [json.loads(line) for line in (runs["true"] / "metrics.jsonl").read_text().splitlines()]
    assert all("effective_rank" in record for record in health if "loss" in record)


def test_a_process_that_does_not_write_keeps_finiteness_flags_not_copies():
    """checkpoints.save, with DDP or FSDP: every process reads each tensor (gathered, under FSDP) but
    only the writer keeps it whole; the others keep a 0-d flag the non-finite check reads the same way."""
    from vitpipe.ssl.engine import checkpoints, sharding

    model = torch.nn.Linear(3, 2)
    flags = sharding.full_state_dict(model, keep=False)
    assert all(v.shape == () and v.item() == 0 for v in flags.values())
    assert checkpoints._first_nonfinite(flags, {"state": {}}) is None
    with torch.no_grad():
        model.bias[1] = float("nan")
    whole, flags = sharding.full_state_dict(model), sharding.full_state_dict(model, keep=False)
    assert checkpoints._first_nonfinite(whole, {"state": {}}) == checkpoints._first_nonfinite(flags, {"state": {}}) \
        == "parameter bias"
    assert sharding.full_optimizer_state(torch.optim.SGD(model.parameters()), keep=False)["state"] == {}
