"""I-JEPA train step: vitpipe beside the official facebookresearch/ijepa code, in one process,
alternating rounds, fastest round each; FLOPs from the masks actually drawn.

    python benchmarks/jepa_step.py --peer-dir /work/peers/ijepa [--batch 64] [--rounds 5] [--steps 3]
    python benchmarks/jepa_step.py            # vitpipe alone, against the matmul roofline

ViT-Ti/4 at 32 px (8x8 patches), predictor 96 wide x 4 blocks x 3 heads (the official code gives
its predictor the encoder's head count), 4 targets of 15-20% of the grid (aspect 0.75-1.5), a
context block of 85-100% minus the targets, at least 4 context patches. A step: the target
encoder's no-grad forward on all patches, layer-normed; the context encoder and predictor forward
and backward (3x their forward); smooth-L1; AdamW; the EMA update. Multiply-adds count 2.

The official side runs as it runs on a CPU: fp32 (its loop autocasts through torch.cuda.amp only),
its own model builder (``src.helper.init_model``), optimizer (``init_opt``: torch's default AdamW,
a per-parameter loop on a CPU, with its lr / wd schedules stepped each iteration), mask collator
(which cuts every image's context and targets to the batch's smallest) and helpers; the step loop
that calls them is written here from its train.py's description (target forward under no_grad,
layer norm, masks applied, loss, backward, step, per-parameter EMA). Nothing of it is copied into
vitpipe; no edit is needed on CPU (``--peer-dir`` is put on sys.path; its modules import as ``src``).
vitpipe runs twice: with its own masks (each image keeps its own context, so a step does more
work: compare per FLOP) and with the official collator's masks (equal context: compare in img/s).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from train_step import block_flops, matmul_gflops
from vitpipe.ssl import registry
from vitpipe.ssl.engine import optim
from vitpipe.ssl.engine.precision import native_bf16

SHAPE = ["model.size=tiny", "model.patch_size=4", "data.image_size=32", "jepa.predictor_heads=3", "train.max_steps=1000"]


def step_flops(jepa, batch: dict) -> float:
    """FLOPs of one training step over the batch, from its mask sizes."""
    enc, pred = jepa.backbone, jepa.predictor
    d, n, depth = enc.embed_dim, enc.num_patches, enc.depth
    p2c = enc.patch_size ** 2 * enc.in_chans
    p, pred_depth = pred.embed.out_features, len(pred.blocks)
    images, kc = batch["context_idx"].shape
    targets, kt = batch["target_idx"].shape[1:]
    embed = 2 * n * p2c * d  # the encoders embed every patch (the context encoder then gathers)
    target_fwd = embed + depth * block_flops(n, d)
    context_fwd = embed + depth * block_flops(kc, d)
    predictor_fwd = 2 * kc * d * p + targets * (pred_depth * block_flops(kc + kt, p) + 2 * kt * p * d)
    return images * (target_fwd + 3 * (context_fwd + predictor_fwd))


def vitpipe_step(precision: str):
    """vitpipe's I-JEPA and a step as its trainer runs it (fused AdamW from engine.optim)."""
    config = registry.pretrain_config("jepa", None, SHAPE)
    torch.manual_seed(0)
    jepa = registry.build_objective(config).train()
    optimizer = optim.build(jepa, config, 64)[0]
    count = [0]

    def step(batch: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = jepa(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        count[0] += 1
        jepa.on_step_end(count[0], 1000)
    return jepa, step


def official(peer_dir: Path):
    """The official model, optimizer and collator, and its train step over (images, enc, pred masks)."""
    sys.path.insert(0, str(peer_dir))
    from src.helper import init_model, init_opt
    from src.masks.multiblock import MaskCollator
    from src.masks.utils import apply_masks
    from src.utils.tensors import repeat_interleave_batch

    torch.manual_seed(0)
    encoder, predictor = init_model("cpu", patch_size=4, model_name="vit_tiny", crop_size=32, pred_depth=4,
                                    pred_emb_dim=96)
    target = copy.deepcopy(encoder)
    for param in target.parameters():
        param.requires_grad = False
    optimizer, _, scheduler, wd_scheduler = init_opt(encoder, predictor, 1000, 2e-4, 1e-3, 1, 1, wd=0.04,
                                                     final_wd=0.4, ipe_scale=1.0)
    collator = MaskCollator(input_size=(32, 32), patch_size=4, enc_mask_scale=(0.85, 1.0),
                            pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=4, min_keep=4,
                            allow_overlap=False)

    def step(images: torch.Tensor, masks_enc: list, masks_pred: list) -> None:
        scheduler.step()
        wd_scheduler.step()
        with torch.no_grad():
            h = F.layer_norm(target(images), (encoder.embed_dim,))
            h = repeat_interleave_batch(apply_masks(h, masks_pred), len(images), repeat=len(masks_enc))
        z = predictor(encoder(images, masks_enc), masks_enc, masks_pred)
        F.smooth_l1_loss(z, h).backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for online, ema in zip(encoder.parameters(), target.parameters()):
                ema.data.mul_(0.996).add_((1 - 0.996) * online.detach().data)
    return collator, step


def timed(step, batches: list, rounds: list[float]) -> None:
    start = time.perf_counter()
    for batch in batches:
        step(*batch)
    rounds.append((time.perf_counter() - start) / len(batches))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-dir", type=Path, help="a checkout of facebookresearch/ijepa")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    roofline = matmul_gflops()
    jepa, fp32_step = vitpipe_step("fp32")
    bf16_step = vitpipe_step("bf16")[1] if native_bf16() is not None else None  # emulated: ~27x slower
    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(args.batch, 3, 32, 32) for _ in range(args.steps)]
    own = [jepa.batch_hook()({"image": x}, generator) for x in images]
    # label: (step, its arguments per batch, the same masks in vitpipe's batch format for FLOPs)
    sides = {"vitpipe fp32, own masks": (fp32_step, [(b,) for b in own], own),
             "vitpipe bf16, own masks": (bf16_step, [(b,) for b in own], own)}
    if args.peer_dir:
        collator, official_step = official(args.peer_dir)
        theirs = [(x, enc, pred) for x, (_, enc, pred) in zip(images, (collator([0] * args.batch) for _ in images))]
        equal = [{"image": x, "context_idx": enc[0], "target_idx": torch.stack(pred, 1)} for x, enc, pred in theirs]
        sides = {"official fp32": (official_step, theirs, equal), **sides,
                 "vitpipe fp32, official masks": (fp32_step, [(b,) for b in equal], equal),
                 "vitpipe bf16, official masks": (bf16_step, [(b,) for b in equal], equal)}
    report(args, {label: side for label, side in sides.items() if side[0] is not None}, roofline, jepa)


def report(args, sides: dict, roofline: float, jepa) -> None:
    timings = {label: [] for label in sides}
    for round_index in range(args.rounds + 1):  # round 0 warms every side up
        for label, (step, batches, _) in sides.items():
            timed(step, batches, timings[label] if round_index else [])
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, fastest of {args.rounds} rounds "
          f"x {args.steps} steps; fp32 matmul (2048^3) {roofline:.1f} GFLOP/s\n")
    print("| step | mean context patches | s/step | img/s | GFLOP/s (work done) | of fp32 matmul |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, (_, _, counted) in sides.items():
        context = sum(b["context_idx"].shape[1] for b in counted) / len(counted)
        flops = sum(step_flops(jepa, b) for b in counted) / len(counted)
        seconds = min(timings[label])
        print(f"| {label} | {context:.1f} | {seconds:.3f} | {args.batch / seconds:.0f} | {flops / seconds / 1e9:.1f} "
              f"| {flops / seconds / 1e9 / roofline:.0%} |", flush=True)


if __name__ == "__main__":
    main()
