"""FSDP2 against DDP on two CPU processes (gloo): training state held per process and step time.

    python benchmarks/fsdp_step.py [--size small] [--image-size 32] [--patch 4] [--batch 32] [--steps 10] [--rounds 2]

Launches `torchrun --nproc_per_node 2` on this file once per mode and round, alternating
(ddp, fsdp, ddp, fsdp, ...). Each process builds vitpipe's MAE for the size, wraps it as the trainer
does (torch DDP, or `vitpipe.ssl.engine.sharding.build_sharded`: only the first process builds the
whole model, the others build it on the meta device and receive their slices), runs 2 warm-up steps and times --steps
AdamW steps. Reported per process: bytes of parameters + gradients + AdamW moments it holds (the
local slices under FSDP), and its peak resident memory (ru_maxrss: includes the ~0.4 GB of the
Python and torch runtime and the transient full blocks FSDP gathers), once when the model is built
and sharded, once after the timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for tensor in tensors:
        if tensor is None:
            continue
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from vitpipe.ssl import registry
    from vitpipe.ssl.engine import optim, sharding

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    config = registry.pretrain_config("mae", None, [f"model.size={args.size}", f"data.image_size={args.image_size}",
                                                    f"model.patch_size={args.patch}"])
    if args.mode == "fsdp":  # as the trainer builds it: whole on the first process only, meta elsewhere
        objective = sharding.build_sharded(lambda: registry.build_objective(config), rank == 0, "cpu")[0]
        model = objective
    else:
        objective = registry.build_objective(config)
        model = torch.nn.parallel.DistributedDataParallel(objective)
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak so far: building and sharding
    optimizer = optim.build(objective, config, args.batch * 2)[0]
    images = torch.rand(args.batch, 3, args.image_size, args.image_size) * 2 - 1

    def step() -> None:
        model({"image": images}).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep gradients allocated: they are part of the state

    for _ in range(2):
        step()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    params = list(objective.parameters())
    moments = [value for state in optimizer.state.values() for value in state.values() if value.ndim]
    state = local_bytes(params) + local_bytes(p.grad for p in params) + local_bytes(moments)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = torch.tensor([seconds, state, peak, built], dtype=torch.float64)
    rows = [torch.zeros_like(row) for _ in range(2)]
    dist.all_gather(rows, row)
    if rank == 0:
        print(json.dumps({"mode": args.mode, "step_s": [r[0].item() for r in rows],
                          "state_bytes": [int(r[1]) for r in rows], "peak_rss": [int(r[2]) for r in rows],
                          "built_rss": [int(r[3]) for r in rows]}))
    dist.destroy_process_group()


def launch(args: argparse.Namespace, mode: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "--worker", "--mode", mode, "--size", args.size, "--image-size", str(args.image_size),
               "--patch", str(args.patch), "--batch", str(args.batch), "--steps", str(args.steps)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{mode} launch failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32, help="per process")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="ddp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = {"ddp": [], "fsdp": []}
    for _ in range(args.rounds):
        for mode in ("ddp", "fsdp"):
            results[mode].append(launch(args, mode))
            print(json.dumps(results[mode][-1]), flush=True)
    print(f"\nMAE ViT-{args.size}, {args.image_size} px / patch {args.patch}, batch {args.batch} per process, 2 processes, "
          f"{args.rounds} alternating rounds (best step time; memory of the first round)")
    print("| mode | step s (per process) | params + grads + AdamW per process | peak RSS once built, process 0 / 1 "
          "| peak RSS, process 0 / 1 |")
    print("|---|---:|---:|---:|---:|")
    for mode, rows in results.items():
        step = min(min(r["step_s"]) for r in rows)
        state = max(rows[0]["state_bytes"]) / 2**20
        peaks = [" / ".join(f"{peak / 2**20:.0f}" for peak in rows[0][key]) for key in ("built_rss", "peak_rss")]
        print(f"| {mode} | {step:.3f} | {state:.1f} MiB | {peaks[0]} MiB | {peaks[1]} MiB |")


if __name__ == "__main__":
    main()
