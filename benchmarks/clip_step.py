"""CLIP train step: vitpipe against open_clip side by side, and against the matmul roofline.

    pip install open_clip_torch==3.3.0
    python benchmarks/clip_step.py [--batch 128] [--rounds 6] [--steps 3] [--threads 2] [--bf16]

Both models have the same shapes: image tower ViT-Ti/4 at 32 px (192 wide, 12 blocks, 3 heads,
average-pooled), text tower 128 wide x 4 blocks x 4 heads, context 32, vocabulary 4096, shared
width 128; AdamW with the same settings (each tool's own: open_clip's training script builds torch's
default AdamW, a per-parameter loop on a CPU; vitpipe its trainer's fused one); the same images.
--bf16 runs both under bf16 autocast: open_clip's `--precision amp_bf16`, its best CPU setting,
is ``torch.autocast(dtype=torch.bfloat16)`` around the forward and loss, as is vitpipe's. Captions are real: titles of Debian's
openclipart-png (falling back to templated Fashion-MNIST captions), each tool tokenising them its
own way into the same vocabulary size: open_clip pads every caption to the context (its tokenizer's
contract), vitpipe to the batch's longest caption. Rounds alternate (vitpipe, open_clip, ...) in one
process, after warm-up steps, so a slower stretch of the machine hits both. FLOPs count the work each
step really does (forward + backward = 3x forward; multiply-adds count 2).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

from train_step import block_flops, matmul_gflops
from vitpipe.ssl import registry
from vitpipe.ssl.engine import optim
from vitpipe.ssl.objectives.clip.objective import TOKENIZER
from vitpipe.ssl.objectives.clip.text import fit_bpe

OPENCLIPART = Path("/usr/share/openclipart/png")
SHAPE = ["model.size=tiny", "model.patch_size=4", "data.image_size=32", "clip.text_width=128", "clip.text_depth=4",
         "clip.text_heads=4", "clip.context_length=32", "clip.vocab_size=4096", "clip.embed_dim=128",
         "optim.lr=1e-4", "optim.betas=[0.9,0.98]", "optim.eps=1e-6", "optim.weight_decay=0.2"]


def captions(count: int) -> list[str]:
    from vitpipe.pipeline.sources import caption_from_filename

    if OPENCLIPART.is_dir():
        titles = [caption_from_filename(p) for p in sorted(OPENCLIPART.rglob("*.png"))]
    else:
        titles = [f"a photo of a {c}." for c in ("shirt", "ankle boot", "bag", "dress", "coat")]
    return [random.Random(i).choice(titles) for i in range(count)] if len(titles) < count else titles


def vitpipe_clip(texts: list[str], batch: int):
    """vitpipe's CLIP and the optimizer its trainer would build for it."""
    config = registry.pretrain_config("clip", None, SHAPE)
    objective = registry.build_objective(config, {TOKENIZER: fit_bpe(texts, 4096, lowercase=True)})
    return objective, optim.build(objective, config, batch)[0]


def open_clip_model():
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=12, width=192, head_width=64, patch_size=4, image_size=32, pool_type="avg")
    text = CLIPTextCfg(context_length=32, vocab_size=4096, width=128, heads=4, layers=4)
    return open_clip.model.CLIP(embed_dim=128, vision_cfg=vision, text_cfg=text), open_clip.ClipLoss()


def step_flops(batch: int, image_tokens: int, text_tokens: int) -> float:
    image = 2 * image_tokens * 4 * 4 * 3 * 192 + 12 * block_flops(image_tokens, 192) + 2 * 192 * 128
    text = 4 * block_flops(text_tokens, 128) + 2 * 128 * 128
    return 3 * batch * (image + text)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="both under bf16 autocast (open_clip's amp_bf16)")
    parser.add_argument("--compile", action="store_true", help="vitpipe's objective under torch.compile (what "
                        "train.compile=auto turns on for a long run when it pays; compile time not counted)")
    parser.add_argument("--full-context", action="store_true",
                        help="give vitpipe captions padded to the context too (where its lead comes from)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    roofline = matmul_gflops()
    texts = captions(8000)
    ours, our_optimizer = vitpipe_clip(texts, args.batch)
    theirs, clip_loss = open_clip_model()
    batches = []
    for index in range(args.steps):
        chunk = texts[index * args.batch:(index + 1) * args.batch]
        tokens, _ = ours.tokenize.encode(chunk)
        padded = torch.zeros(len(chunk), 32, dtype=torch.long)
        padded[:, :tokens.shape[1]] = tokens
        padded[torch.arange(len(chunk)), (tokens == 2).int().argmax(dim=1)] = 4095  # open_clip pools at the argmax id
        if args.full_context:
            tokens = torch.cat([tokens, torch.zeros(len(chunk), 32 - tokens.shape[1], dtype=torch.long)], dim=1)
        batches.append((torch.randn(len(chunk), 3, 32, 32), tokens, padded))

    forward = torch.compile(ours) if args.compile else ours

    def vitpipe_step(images, tokens, _):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = forward({"image": images, "tokens": tokens}).loss
        loss.backward()

    def open_clip_step(images, _, padded):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            image_features, text_features, scale = theirs(images, padded)
            loss = clip_loss(image_features, text_features, scale)
        loss.backward()

    timings = {"vitpipe": [], "open_clip": []}
    runners = {"vitpipe": (vitpipe_step, ours), "open_clip": (open_clip_step, theirs)}
    optimizers = {"vitpipe": our_optimizer, "open_clip": torch.optim.AdamW(
        theirs.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)}
    for round_index in range(args.rounds + 1):  # round 0 warms both up
        for name, (run_step, _) in runners.items():
            start = time.perf_counter()
            for batch in batches:
                run_step(*batch)
                optimizers[name].step()
                optimizers[name].zero_grad(set_to_none=True)
            if round_index:
                timings[name].append((time.perf_counter() - start) / len(batches))
    text_len = statistics.mean(b[1].shape[1] for b in batches)
    image_tokens = ours.backbone.num_patches + ours.backbone.num_prefix_tokens  # both keep a class token
    flops = {"vitpipe": step_flops(args.batch, image_tokens, text_len), "open_clip": step_flops(args.batch, 65, 32)}
    print(f"torch {torch.__version__}, {'bf16 autocast' if args.bf16 else 'fp32'}{', vitpipe compiled' if args.compile else ''}, {args.threads} threads, batch {args.batch}, {args.rounds} rounds x {args.steps} "
          f"steps; captions {'openclipart titles' if OPENCLIPART.is_dir() else 'templates'}, vitpipe's mean token "
          f"width {text_len:.1f} of 32")
    print(f"fp32 matmul (2048^3): {roofline:.1f} GFLOP/s\n")
    print("| step | median s/step | img/s | GFLOP/s (work done) | of matmul |\n|---|---:|---:|---:|---:|")
    for name, seconds in timings.items():
        median = statistics.median(seconds)
        gflops = flops[name] / median / 1e9
        print(f"| {name} | {median:.3f} | {args.batch / median:.0f} | {gflops:.1f} | {gflops / roofline:.0%} |")
    ratio = statistics.median(timings["open_clip"]) / statistics.median(timings["vitpipe"])
    print(f"\nvitpipe / open_clip speed: {ratio:.2f}x (per-round ratios: "
          f"{', '.join(f'{o / v:.2f}' for v, o in zip(timings['vitpipe'], timings['open_clip']))})")


if __name__ == "__main__":
    main()
