"""An objective is one file + one registry entry: this file is that file for a toy objective
(its own config section and recipe defaults, an artefact fitted from the data, an encoder that is
not a ViT, a report figure, its own `vitpipe eval palette`), and it runs pretrain -> resume -> linear-probe -> knn -> export ->
report through the CLI with no other file of vitpipe changed."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vitpipe.cli import main
from vitpipe.config import check
from vitpipe.ssl import registry
from vitpipe.ssl.objective import Objective, ObjectiveCommand, ObjectiveSpec, Output

# -- the objective's own file would hold everything from here ... ----------------------------


@dataclass
class ToyConfig:
    grid: int = 4
    """Tokens per side: the image is average-pooled to grid x grid colours."""
    levels: int = 4
    """Grey levels of the palette fitted from the training images."""

    def __post_init__(self) -> None:
        check(self.levels >= 2, "toy.levels must be >= 2")


class PaletteEncoder(nn.Module):
    """Not a ViT: pooled colours, snapped to the fitted palette, through a stack of MLP blocks."""

    def __init__(self, palette: torch.Tensor, width: int, depth: int, grid: int) -> None:
        super().__init__()
        self.register_buffer("palette", palette)
        self.grid, self.embed_dim = grid, width
        self.embed = nn.Linear(3, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
                                    for _ in range(depth))

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def quantize(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, grid*grid, 3] colours snapped to the nearest palette level."""
        colours = F.adaptive_avg_pool2d(images, self.grid).flatten(2).transpose(1, 2)
        nearest = (colours.unsqueeze(-1) - self.palette).abs().argmin(dim=-1)
        return self.palette[nearest]

    def intermediate_layers(self, images: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        x, outputs = self.embed(self.quantize(images)), []
        for block in self.blocks:
            x = x + block(x)
            outputs.append(x)
        return [outputs[layer] for layer in layers]

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.intermediate_layers(images, [-1])[0]

    def pool(self, tokens: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        return tokens.mean(dim=1)


class ToyObjective(Objective):
    """Predict each token's un-quantised colour from the quantised sequence."""

    batch_fields = ("image",)

    def __init__(self, encoder: PaletteEncoder) -> None:
        super().__init__()
        self.backbone = encoder
        self.head = nn.Linear(encoder.embed_dim, 3)

    def encoder(self) -> PaletteEncoder:
        return self.backbone

    def forward(self, batch):
        images = batch["image"]
        target = F.adaptive_avg_pool2d(images, self.backbone.grid).flatten(2).transpose(1, 2)
        loss = F.mse_loss(self.head(self.backbone.forward_features(images)), target)
        return Output(loss, {"palette_levels": float(len(self.backbone.palette))})


FITS = {"count": 0}


def fit_palette(config, read) -> dict[str, bytes]:
    FITS["count"] += 1
    values = torch.cat([batch["image"].flatten() for batch in read(("image",), 64)])
    levels = torch.quantile(values, torch.linspace(0, 1, config.toy.levels)).numpy().astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, levels)
    return {"palette.npy": buffer.getvalue()}


def build(config, artifacts: dict[str, bytes]) -> ToyObjective:
    palette = torch.from_numpy(np.load(io.BytesIO(artifacts["palette.npy"])))
    return ToyObjective(PaletteEncoder(palette, config.model.embed_dim, config.model.depth, config.toy.grid))


def palette_figure(ctx):
    palette = ctx.encoder.palette.numpy()
    strip = np.repeat(((palette + 1) * 127.5).clip(0, 255).astype(np.uint8)[None, :], 8, axis=0)
    path = ctx.out_dir / "palette.png"
    Image.fromarray(np.kron(strip, np.ones((4, 8), dtype=np.uint8))).save(path)
    return "Fitted palette", "The grey levels the toy encoder snaps colours to.", path


def palette_command(run: Path) -> None:
    """Print the grey levels the toy fitted (its own eval, found by the CLI through SPEC)."""
    levels = np.load(run / "artifacts" / "palette.npy").reshape(-1)
    print("palette:", " ".join(f"{level:.3f}" for level in levels))


SPEC = ObjectiveSpec(name="toy", build=build, section="toy", section_type=ToyConfig, fit_artifacts=fit_palette,
                     defaults={"optim": {"betas": [0.8, 0.9], "base_lr": 0.01}, "toy": {"levels": 3}},
                     summary="a test objective", figures=(palette_figure,),
                     commands=(ObjectiveCommand("palette", palette_command),))


# -- ... down to here; and the one registry line: --------------------------------------------


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(registry.OBJECTIVES, "toy", SPEC)
    FITS["count"] = 0


ARGS = ["model.size=micro", "data.image_size=16", "train.batch_size=8", "train.log_every=1", "data.num_workers=0",
        "train.tensorboard=false", "train.ckpt_every_steps=2"]


def test_toy_objective_end_to_end_through_the_cli(toy_registered, labelled_shards, tmp_path, capsys):
    run, train, test = tmp_path / "run", labelled_shards / "train", labelled_shards / "val"
    assert main(["config", "show", "--objective", "toy", "toy.grid=2"]) == 0
    shown = capsys.readouterr().out
    assert "toy:\n  grid: 2\n  levels: 3" in shown and "- 0.8\n  - 0.9" in shown  # its section and recipe
    assert main(["pretrain", "toy", "--data", str(train), "--out", str(run), *ARGS, "train.max_steps=3",
                 "mae.mask_ratio=0.5"]) == 2  # another objective's section is an unknown key
    assert main(["pretrain", "toy", "--data", str(train), "--out", str(run), *ARGS, "train.max_steps=3"]) == 0
    info = json.loads((run / "run.json").read_text())
    assert set(info["artifacts"]) == {"palette.npy"} and (run / "artifacts" / "palette.npy").is_file()
    assert "betas:\n  - 0.8" in (run / "config.yaml").read_text()
    # resume: more steps, the artefact loaded, not fitted again
    assert main(["pretrain", "toy", "--data", str(train), "--out", str(run), "--resume", "auto", *ARGS,
                 "train.max_steps=6"]) == 0
    assert FITS["count"] == 1
    capsys.readouterr()
    assert main(["eval", "palette", str(run)]) == 0  # its own command, found through SPEC.commands
    assert capsys.readouterr().out.startswith("palette: ")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]  # events (health at step 1) aside

    common = ["--train", str(train), "--test", str(test), "--workers", "0"]
    assert main(["eval", "linear-probe", str(run), *common, "--epochs", "2", "--layers", "0,1"]) == 0
    assert main(["eval", "knn", str(run), *common, "--layer", "0"]) == 0
    assert main(["eval", "knn", str(run), *common, "--init", "random"]) == 0
    probe = json.loads((run / "eval" / "linear-probe.json").read_text())
    assert set(probe["per_layer"]) == {"block0", "block1"} and probe["test_samples"] > 0

    assert main(["export", str(run), "--out", str(tmp_path / "exp"), "--format", "vitpipe"]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "timm"), "--format", "timm"]) == 2  # not a ViT
    from vitpipe.export import load_exported
    from vitpipe.ssl.runs import load_run_encoder

    exported, (trained, _, _) = load_exported(tmp_path / "exp"), load_run_encoder(run)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(exported.pool(exported.forward_features(images)), trained.pool(trained.forward_features(images)))

    assert main(["report", str(run)]) == 0
    page = (run / "report" / "index.html").read_text()
    assert "Fitted palette" in page and (run / "report" / "palette.png").is_file()
    assert "CLS attention" not in page  # ViT-only figures skip an encoder that is not a ViT
