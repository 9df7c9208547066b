"""Two CPU processes with gloo, through both supported launchers."""

import json
import os
import subprocess
import sys

import pytest

from test_trainer import RUN_ARGS

LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "-m", "vitpipe"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--main_process_port", "0", "-m", "vitpipe"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_process_training(launcher, tmp_path):
    from test_loader import write_shards

    shards = write_shards(tmp_path / "shards", sizes=[12] * 6)  # 72 samples
    run = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    args = [*RUN_ARGS, "data.image_size=8", "model.patch_size=2", "train.max_steps=4", "train.record_keys=true",
            "data.num_workers=1"]
    result = subprocess.run([*LAUNCHERS[launcher], "pretrain", "mae", "--data", str(shards), "--out", str(run),
                             *args], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    finals = [json.loads((run / "audit" / f"rank{r}.final.json").read_text()) for r in range(2)]
    assert all(f["world_size"] == 2 and f["global_batch"] == 16 for f in finals)  # 8 per rank, summed
    assert finals[0]["param_abs_sum"] == finals[1]["param_abs_sum"]  # one model, not two copies
    keys = []
    for rank in range(2):
        lines = [json.loads(l) for l in (run / "audit" / f"rank{rank}.jsonl").read_text().splitlines()]
        assert len(lines) == 4 and all(len(l["keys"]) == 8 for l in lines)
        keys.append({k for l in lines for k in l["keys"]})
    assert len(keys[0]) == 32 and len(keys[1]) == 32 and not keys[0] & keys[1]  # disjoint samples
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["samples"] for m in metrics] == [16, 32, 48, 64]


def test_accelerate_cpu_flag_trap_is_refused(tmp_path):
    from test_loader import write_shards

    shards = write_shards(tmp_path / "shards", sizes=[12] * 2)
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                             "-m", "vitpipe", "pretrain", "mae", "--data", str(shards), "--out", str(tmp_path / "run"),
                             *RUN_ARGS, "data.image_size=8", "model.patch_size=2", "train.max_steps=2"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert "starts only ONE process" in result.stderr


def _gather_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from vitpipe.ssl.engine.distributed import gather_with_grad

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    mine = torch.arange(6, dtype=torch.float32).reshape(3, 2).add(10 * rank).requires_grad_()
    gathered = gather_with_grad(mine)
    weights = torch.linspace(-1, 1, 12).reshape(6, 2)
    ((gathered * weights) ** 2).sum().backward()
    torch.save({"gathered": gathered.detach(), "grad": mine.grad}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_gather_with_grad_is_global_and_differentiable(tmp_path):
    """Two gloo processes: every rank sees both batches in rank order, and each rank's gradient is
    the gradient of the summed per-rank losses with respect to its own slice."""
    import torch
    import torch.multiprocessing as mp

    from vitpipe.ssl.engine.distributed import gather_with_grad

    mp.spawn(_gather_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    both = torch.cat([torch.arange(6, dtype=torch.float32).reshape(3, 2).add(10 * r) for r in range(2)]).requires_grad_()
    weights = torch.linspace(-1, 1, 12).reshape(6, 2)
    (2 * ((both * weights) ** 2).sum()).backward()  # each of the 2 ranks computed the same global loss
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(saved["gathered"], both.detach())
        assert torch.allclose(saved["grad"], both.grad[3 * rank:3 * (rank + 1)])
    single = torch.ones(2, 2, requires_grad=True)
    assert gather_with_grad(single) is single  # one process: the identity
