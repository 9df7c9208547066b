"""Pictures of what a ViT learned: reconstructions, attention, position embeddings, retrieval hits."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vitpipe.ssl.objectives.mae.objective import MAE  # noqa: E402
from vitpipe.ssl.vit import VisionTransformer, patchify, unpatchify  # noqa: E402


def _to_image(tensor: torch.Tensor, mean, std) -> np.ndarray:
    """[C, H, W] normalized -> [H, W, C] in 0..1."""
    channels = tensor.shape[0]
    mean = torch.tensor(mean[:channels]).view(-1, 1, 1)
    std = torch.tensor(std[:channels]).view(-1, 1, 1)
    image = (tensor * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return image[..., 0] if channels == 1 else image


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


@torch.no_grad()
def mae_reconstructions(mae: MAE, images: torch.Tensor, mean, std, out: Path, seed: int = 0) -> Path:
    """Rows of: original | masked | reconstruction | reconstruction with the visible patches pasted."""
    mae.eval()
    torch.manual_seed(seed)
    patch, channels, grid = mae.patch_size, mae.channels, mae.backbone.grid
    keep_idx, mask, restore_idx = mae.random_masking(images.shape[0], images.device)
    pred = mae.forward_decoder(mae.forward_encoder(images, keep_idx), restore_idx)
    target = patchify(images, patch)
    if mae.config.norm_pix_loss:  # predictions are in per-patch normalized units: undo with the true stats
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    hidden = mask.unsqueeze(-1)
    masked = unpatchify(target * (1 - hidden) + (-10.0) * hidden, patch, channels, grid)  # hidden -> dark
    reconstruction = unpatchify(pred, patch, channels, grid)
    pasted = unpatchify(target * (1 - hidden) + pred * hidden, patch, channels, grid)
    columns = [("original", images), ("masked 75%", masked), ("reconstruction", reconstruction),
               ("+ visible patches", pasted)]
    fig, axes = plt.subplots(len(images), 4, figsize=(6.4, 1.6 * len(images)), squeeze=False)
    for row in range(len(images)):
        for col, (title, batch) in enumerate(columns):
            axes[row, col].imshow(_to_image(batch[row], mean, std), cmap="gray" if channels == 1 else None)
            axes[row, col].axis("off")
            if row == 0:
                axes[row, col].set_title(title, fontsize=8)
    return _save(fig, out)


@torch.no_grad()
def attention_per_layer(encoder: VisionTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    """Softmax attention weights of every block: list of [B, heads, T, T]."""
    encoder.eval()
    x = encoder.add_prefix(encoder.embed(images))
    maps = []
    for block in encoder.blocks:
        maps.append(block.attn.attention_weights(block.norm1(x)))
        x = block(x)
    return maps


@torch.no_grad()
def cls_attention(encoder: VisionTransformer, images: torch.Tensor, mean, std, out: Path) -> Path | None:
    """Last-block attention of the CLS token to each patch, one column per head."""
    if encoder.cls_token is None:
        return None
    weights = attention_per_layer(encoder, images)[-1]  # [B, H, T, T]
    heads = weights.shape[1]
    grid = encoder.grid
    top = float(weights[:, :, 0, encoder.num_prefix_tokens:].max())  # one colour scale for every map
    fig, axes = plt.subplots(len(images), heads + 1, figsize=(1.5 * (heads + 1), 1.5 * len(images)), squeeze=False)
    for row in range(len(images)):
        image = _to_image(images[row], mean, std)
        axes[row, 0].imshow(image, cmap="gray" if image.ndim == 2 else None)
        for head in range(heads):
            attention = weights[row, head, 0, encoder.num_prefix_tokens:].reshape(1, 1, *grid)
            attention = F.interpolate(attention, size=images.shape[-2:], mode="nearest")[0, 0]
            shown = axes[row, head + 1].imshow(attention.numpy(), cmap="inferno", vmin=0, vmax=top)
            if row == 0:
                axes[row, head + 1].set_title(f"head {head}", fontsize=8)
        for axis in axes[row]:
            axis.axis("off")
    axes[0, 0].set_title("image", fontsize=8)
    bar = fig.colorbar(shown, ax=axes[:, 1:].ravel().tolist(), shrink=0.6, pad=0.02)
    bar.set_label("attention weight", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    return _save(fig, out)


def position_similarity(encoder: VisionTransformer, out: Path) -> Path:
    """One tile per patch position: cosine similarity of its position embedding to all others."""
    table = encoder.pos_embed[0, encoder.num_prefix_tokens:].detach()
    table = F.normalize(table, dim=-1)
    similarity = (table @ table.T).reshape(*encoder.grid, *encoder.grid).numpy()
    rows, cols = encoder.grid
    fig, axes = plt.subplots(rows, cols, figsize=(0.6 * cols + 1, 0.6 * rows + 0.5), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            shown = axes[r, c].imshow(similarity[r, c], vmin=-1, vmax=1, cmap="viridis")
            axes[r, c].axis("off")
    fig.suptitle("position embedding cosine similarity", fontsize=9)
    fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.6, pad=0.02).ax.tick_params(labelsize=6)
    return _save(fig, out)


@torch.no_grad()
def mean_attention_distance(encoder: VisionTransformer, images: torch.Tensor) -> np.ndarray:
    """[layers, heads]: attention-weighted mean distance (pixels) between query and key patches."""
    prefix = encoder.num_prefix_tokens
    rows, cols = encoder.grid
    coords = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    distance = torch.cdist(coords.float(), coords.float()) * encoder.patch_size  # [N, N]
    result = []
    for weights in attention_per_layer(encoder, images):
        patch_weights = weights[:, :, prefix:, prefix:]
        patch_weights = patch_weights / patch_weights.sum(dim=-1, keepdim=True)
        result.append((patch_weights * distance).sum(dim=-1).mean(dim=(0, 2)).numpy())
    return np.stack(result)


def attention_distance_plot(distances: np.ndarray, out: Path) -> Path:
    fig, axis = plt.subplots(figsize=(5, 3.2))
    layers, heads = distances.shape
    for head in range(heads):
        axis.scatter(np.arange(layers), distances[:, head], s=12, label=f"head {head}" if heads <= 8 else None)
    axis.set(xlabel="block", ylabel="mean attention distance (px)", title="attention distance per head")
    axis.grid(alpha=0.3)
    if heads <= 8:
        axis.legend(fontsize=6)
    return _save(fig, out)


def retrieval_grid(queries: list[np.ndarray], hits: list[list[tuple[np.ndarray, str, float]]], out: Path) -> Path:
    """Each row: a query image, then its nearest neighbours with key and similarity."""
    width = 1 + max(len(h) for h in hits)
    fig, axes = plt.subplots(len(queries), width, figsize=(1.3 * width, 1.45 * len(queries)), squeeze=False)
    for row, (query, row_hits) in enumerate(zip(queries, hits)):
        axes[row, 0].imshow(query, cmap="gray" if query.ndim == 2 else None)
        axes[row, 0].set_title("query", fontsize=7)
        for col, (image, key, similarity) in enumerate(row_hits, start=1):
            axes[row, col].imshow(image, cmap="gray" if image.ndim == 2 else None)
            axes[row, col].set_title(f"{similarity:.2f}", fontsize=6)
        for axis in axes[row]:
            axis.axis("off")
    return _save(fig, out)


def confusion_matrix(counts: list[list[int]], names: list[str], out: Path) -> Path:
    """Rows: true class, columns: predicted; each row normalised to its class size."""
    matrix = np.asarray(counts, dtype=float)
    matrix = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = 0.35 * len(names) + 2
    fig, axis = plt.subplots(figsize=(size, size))
    axis.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    axis.set_yticks(range(len(names)), names, fontsize=7)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    return _save(fig, out)


def layer_probe_curve(per_block: dict[int, dict], out: Path, concatenated: dict | None = None) -> Path:
    """Linear-probe test top-1 (and the val top-1 it was picked on) against the block probed
    (``features.single_blocks``); ``concatenated``: the probe on all of them side by side, a dashed line."""
    blocks = list(per_block.items())
    fig, axis = plt.subplots(figsize=(5, 3.2))
    axis.plot([b for b, _ in blocks], [r["top1"] for _, r in blocks], marker="o", label="test top-1")
    axis.plot([b for b, _ in blocks], [r["val_top1"] for _, r in blocks], marker=".", alpha=0.6, label="val top-1")
    if concatenated:
        axis.axhline(concatenated["top1"], linestyle="--", color="grey", label="blocks concatenated, test top-1")
    axis.set_xticks([b for b, _ in blocks])  # blocks are whole numbers
    axis.set(xlabel="block (0-based)", ylabel="top-1", title="linear probe by layer")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    return _save(fig, out)
