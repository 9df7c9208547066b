"""vitpipe's DINO train step side by side with the official facebookresearch/dino code, in one
process, alternating rounds, fastest of --rounds each: the same ViT-Ti/4 at 32 px, 2 global + 8
local 12 px crops, head 2048 / 256 / --out-dim, AdamW, gradient clipping at 3, last layer frozen,
EMA teacher. The official code is read from --peer-dir (a checkout of facebookresearch/dino:
main_dino.py, utils.py, vision_transformer.py), never copied into vitpipe.

    python benchmarks/dino_step.py --peer-dir /work/peers/dino --batch 64 --rounds 8 [--compile]

Edits the official code needs on a CPU: none to its files. Its training loop moves images with
``.cuda()`` and its loss all-reduces the centre, so this script drives its modules (MultiCropWrapper,
DINOHead, DINOLoss, utils.clip_gradients, cancel_gradients_last_layer, the EMA loop of
train_one_epoch) in the same order as train_one_epoch, on the CPU, with a one-process gloo group.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from vitpipe.ssl import registry
from vitpipe.ssl.engine import optim
from vitpipe.ssl.engine.precision import native_bf16, synthetic_batch


def vitpipe_step(args, precision: str, compiled: bool = False):
    """vitpipe's step as its trainer runs it: the optimizer from engine.optim.build (fused AdamW);
    ``compiled``: the student (``trainable_module()``) under torch.compile, the teacher eager, as
    the trainer wraps it when ``train.compile`` is on."""
    config = registry.pretrain_config("dino", None, [
        "model.size=tiny", "model.patch_size=4", "data.image_size=32", f"dino.out_dim={args.out_dim}",
        "dino.hidden_dim=2048", "dino.bottleneck_dim=256", "dino.local_crops=8", "dino.local_size=12",
        "optim.lr=1e-4", "optim.weight_decay=0.04", "optim.weight_decay_end=0.04"])
    torch.manual_seed(0)
    objective = registry.build_objective(config, {}).train()
    if compiled:
        objective.bind_trainable(torch.compile(objective.trainable_module()))
    optimizer = optim.build(objective, config, args.batch)[0]
    batch = synthetic_batch(objective, config.data, args.batch)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = objective(batch).loss
        loss.backward()
        objective.after_backward(1, 100)
        torch.nn.utils.clip_grad_norm_(objective.parameters(), 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.on_step_end(1, 100)
    return step, batch["image"]


def official_step(args, views):
    sys.path.insert(0, str(args.peer_dir))
    import main_dino
    import utils
    import vision_transformer as vits

    torch.manual_seed(0)
    student = vits.vit_tiny(patch_size=4, img_size=[32])
    teacher = vits.vit_tiny(patch_size=4, img_size=[32])
    student = utils.MultiCropWrapper(student, vits.DINOHead(192, args.out_dim, use_bn=False, norm_last_layer=True))
    teacher = utils.MultiCropWrapper(teacher, vits.DINOHead(192, args.out_dim, use_bn=False))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    loss_fn = main_dino.DINOLoss(args.out_dim, 10, 0.04, 0.07, 30, 100)
    optimizer = torch.optim.AdamW(utils.get_params_groups(student), lr=1e-4, weight_decay=0.04)

    def step():
        teacher_output = teacher(views[:2])
        student_output = student(views)
        loss = loss_fn(student_output, teacher_output, 0)
        optimizer.zero_grad()
        loss.backward()
        utils.clip_gradients(student, 3.0)
        utils.cancel_gradients_last_layer(0, student, 1)
        optimizer.step()
        with torch.no_grad():
            for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                param_k.data.mul_(0.996).add_((1 - 0.996) * param_q.detach().data)
    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer-dir", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out-dim", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="add vitpipe fp32 + torch.compile (what "
                        "train.compile=auto turns on for a long run when it pays; compile time not counted)")
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    ours, views = vitpipe_step(args, "fp32")
    steps = {"vitpipe fp32": ours, "official fp32": official_step(args, views)}
    if native_bf16() is not None:  # emulated bf16 (AVX2 only) ran a step in 131 s against 4.9 at fp32
        steps["vitpipe bf16 autocast"] = vitpipe_step(args, "bf16")[0]
    if args.compile:
        steps["vitpipe fp32 + compile"] = vitpipe_step(args, "fp32", compiled=True)[0]
    for step in steps.values():  # warm-up (compiling: both crop resolutions)
        step()
        step()
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    official = min(times["official fp32"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, ViT-Ti/4, 2 x 32 px + "
          f"8 x 12 px crops, out_dim {args.out_dim}; fastest of {args.rounds} alternating rounds")
    print("| step | seconds | images/s | vs official |\n|---|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {min(values):.3f} | {args.batch / min(values):.1f} | {official / min(values):.2f}x |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
