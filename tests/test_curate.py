"""`vitpipe curate` end to end: near-duplicates, evaluation look-alikes (re-encoded, resized,
brightened, cropped), simple filters; the accounting, the log, the lineage, the refusals."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from vitpipe.cli import main
from vitpipe.config import IngestConfig
from vitpipe.curate.run import read_log
from vitpipe.pipeline.ingest import ingest


def picture(seed: int, size: int = 64) -> Image.Image:
    """A smooth random picture (a 5x5 colour grid, upscaled): what photos look like to a pHash."""
    grid = np.random.default_rng(seed).integers(0, 256, (5, 5, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((size, size), Image.BICUBIC)


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def crop(image: Image.Image, fraction: float, fx: float, fy: float) -> Image.Image:
    w, h = round(image.width * fraction), round(image.height * fraction)
    left, top = round((image.width - w) * fx), round((image.height - h) * fy)
    return image.crop((left, top, left + w, top + h))


LOOK_ALIKES = {  # evaluation picture seed -> its transformed copy in the training pool
    100: lambda im: jpeg(im, 40),
    101: lambda im: im.resize((128, 128), Image.BICUBIC),
    102: lambda im: im.resize((40, 40), Image.BICUBIC),
    103: lambda im: ImageEnhance.Brightness(im).enhance(1.1),
    104: lambda im: crop(im, 0.9, 0.0, 0.0),
    105: lambda im: crop(im, 0.88, 0.5, 0.5),
    106: lambda im: crop(im, 0.93, 1.0, 0.3),
    107: lambda im: im.copy(),
}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate")
    (root / "train" / "a").mkdir(parents=True)
    (root / "test" / "a").mkdir(parents=True)
    for seed in range(40):
        picture(seed).save(root / "train" / "a" / f"p{seed}.png")
    jpeg(picture(0), 50).save(root / "train" / "a" / "dup0.png")  # near-duplicates of training pictures
    picture(1, 32).save(root / "train" / "a" / "dup1small.png")
    Image.new("RGB", (64, 8), "red").save(root / "train" / "a" / "strip.png")  # aspect 8
    for seed, transform in LOOK_ALIKES.items():
        transform(picture(seed)).save(root / "train" / "a" / f"leak{seed}.png")
    for seed in range(100, 120):
        picture(seed).save(root / "test" / "a" / f"t{seed}.png")
    for name in ("train", "test"):
        ingest(str(root / name), root / f"{name}_shards", IngestConfig(image_size=0, shard_size=16, dedup=False),
               progress=False)
    (root / "recipe.yaml").write_text(
        "steps:\n  - filter: {max_aspect: 4}\n  - near_dup: {radius: 4}\n"
        f"  - decontaminate: {{against: [{root / 'test_shards'}]}}\n")
    return root


def keys_by_name(shards) -> dict[str, str]:
    """Ingest key -> the source file's stem, from each sample's json."""
    from vitpipe.pipeline.shardset import open_shard, resolve_shards
    from vitpipe.pipeline.tario import iter_tar_samples

    found = {}
    for url in resolve_shards(str(shards)).urls:
        with open_shard(url) as handle:
            for sample in iter_tar_samples(handle):
                meta = json.loads(sample["json"])
                found[sample["__key__"]] = str(meta.get("source") or meta.get("path") or meta["key"])
    return found


def test_curate_removes_look_alikes_duplicates_and_unfit_samples_and_accounts_for_each(pool, tmp_path, capsys):
    out = tmp_path / "curated"
    assert main(["curate", str(pool / "train_shards"), "--out", str(out), "--config", str(pool / "recipe.yaml")]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == 51 and manifest["rows"] == manifest["written"] + sum(manifest["removed"].values())
    assert manifest["removed"] == {"aspect": 1, "contaminated": len(LOOK_ALIKES), "near_duplicate": 2}
    assert manifest["parent"] == __import__("hashlib").sha256((pool / "train_shards" / "manifest.json").read_bytes()).hexdigest()
    log = read_log(out / "curation.jsonl")
    names = {**keys_by_name(pool / "train_shards"), **keys_by_name(pool / "test_shards")}
    leaks = {names[r["key"]].rsplit("/", 1)[-1]: names[r["duplicate_of"]].rsplit("/", 1)[-1]
             for r in log if r["reason"] == "contaminated"}
    assert leaks == {f"leak{seed}.png": f"t{seed}.png" for seed in LOOK_ALIKES}, leaks
    dups = {names[r["key"]].rsplit("/", 1)[-1] for r in log if r["reason"] == "near_duplicate"}
    assert "dup1small.png" in dups and len(dups & {"p0.png", "dup0.png"}) == 1  # the larger kept; a tie: the first
    assert sum(json.loads((out / "sizes.json").read_text()).values()) == manifest["written"]
    assert "kept 40" in capsys.readouterr().out


def test_curated_shards_train_and_keep_their_samples_byte_for_byte(pool, tmp_path):
    from vitpipe.pipeline.census import sample_hashes
    from vitpipe.pipeline.shardset import resolve_shards

    out = tmp_path / "curated"
    assert main(["curate", str(pool / "train_shards"), "--out", str(out), "near_dup.radius=4"]) == 0
    before = sample_hashes(resolve_shards(str(pool / "train_shards")))
    after = sample_hashes(resolve_shards(str(out)))
    assert after < before and len(before - after) == 2
    assert main(["pretrain", "mae", "--data", str(out), "--out", str(tmp_path / "run"), "model.size=micro",
                 "data.image_size=16", "train.batch_size=8", "train.max_steps=1", "data.num_workers=0",
                 "train.tensorboard=false", "mae.decoder_dim=32", "mae.decoder_heads=2", "mae.decoder_depth=1"]) == 0


@pytest.mark.parametrize("args,words", [
    (["semantic_dedup.eps=0.05"], "semantic_dedup.encoder needs a run directory"),
    (["dedupe.radius=3"], "unknown curation step 'dedupe'"),
    (["near_dup.radious=3"], "unknown config key near_dup.radious"),
    (["near_dup.radius=99"], "near_dup.radius must be in 0..16"),
    (["decontaminate.against=[/nonexistent/x]"], "/nonexistent/x"),
    ([], "no curation steps"),
])
def test_recipe_mistakes_are_one_line(pool, tmp_path, capsys, args, words):
    assert main(["curate", str(pool / "train_shards"), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "o").exists()


def test_out_inside_the_input_or_not_empty_is_refused_and_the_input_untouched(pool, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in (pool / "train_shards").rglob("*") if p.is_file()}
    assert main(["curate", str(pool / "train_shards"), "--out", str(pool / "train_shards"), "near_dup.radius=4"]) == 2
    assert "holds the input shards" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    assert main(["curate", str(pool / "train_shards"), "--out", str(tmp_path / "full"), "near_dup.radius=4"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (pool / "train_shards").rglob("*") if p.is_file()} == before


def test_overwrite_replaces_an_earlier_curate_and_never_a_users_files(pool, tmp_path, capsys):
    """--overwrite of a folder curate did not write deleted it whole (``--out ~`` would have)."""
    args = ["curate", str(pool / "train_shards"), "near_dup.radius=4", "--overwrite", "--out"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    assert main([*args, str(tmp_path / "mine")]) == 2
    assert "did not write" in capsys.readouterr().err and (tmp_path / "mine" / "notes.txt").read_text() == "x"
    earlier = tmp_path / "earlier"
    assert main([*args, str(earlier)]) == 0
    (earlier / "notes.txt").write_text("y")  # a user's file put beside an earlier curate
    assert main([*args, str(earlier)]) == 2
    assert "notes.txt" in capsys.readouterr().err and (earlier / "notes.txt").read_text() == "y"
    (earlier / "notes.txt").unlink()
    assert main([*args, str(earlier)]) == 0 and (earlier / "manifest.json").is_file()


def test_a_killed_curates_leftovers_go_and_a_file_as_out_is_one_line(pool, tmp_path, capsys):
    stale = tmp_path / ".tmp-curate-out-999999999"  # no such process
    stale.mkdir()
    (stale / "00000.tar").write_bytes(b"half")
    assert main(["curate", str(pool / "train_shards"), "--out", str(tmp_path / "out"), "near_dup.radius=4"]) == 0
    assert not stale.exists() and not list(tmp_path.glob(".tmp-curate-*"))
    (tmp_path / "file").write_text("x")
    capsys.readouterr()
    assert main(["curate", str(pool / "train_shards"), "--out", str(tmp_path / "file"), "near_dup.radius=4"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_filter_reasons_and_scores():
    from vitpipe.curate.recipe import FilterStep
    from vitpipe.curate.steps import Item, run_filter

    items = [Item(0, "small", 20, 40, 5), Item(1, "strip", 400, 50, 5), Item(2, "terse", 64, 64, 1),
             Item(3, "fine", 64, 48, 3)]
    removed = run_filter(items, FilterStep(min_side=32, max_aspect=4, min_caption_words=2))
    assert {p: (r.reason, r.score) for p, r in removed.items()} == {
        0: ("too_small", 20.0), 1: ("aspect", 8.0), 2: ("short_caption", 1.0)}


def test_flipped_copies_are_found_only_with_flips(tmp_path):
    for name in ("train", "test"):
        (tmp_path / name / "a").mkdir(parents=True)
    for seed in range(6):
        picture(200 + seed).save(tmp_path / "train" / "a" / f"p{seed}.png")
        picture(300 + seed).save(tmp_path / "test" / "a" / f"t{seed}.png")
    picture(300).transpose(Image.FLIP_LEFT_RIGHT).save(tmp_path / "train" / "a" / "mirrored.png")
    for name in ("train", "test"):
        ingest(str(tmp_path / name), tmp_path / f"{name}_shards", IngestConfig(image_size=0), progress=False)
    against = f"decontaminate.against=[{tmp_path / 'test_shards'}]"
    assert main(["curate", str(tmp_path / "train_shards"), "--out", str(tmp_path / "plain"), against]) == 0
    assert json.loads((tmp_path / "plain" / "manifest.json").read_text())["removed"] == {}
    assert main(["curate", str(tmp_path / "train_shards"), "--out", str(tmp_path / "flips"), against,
                 "decontaminate.flips=true"]) == 0
    assert json.loads((tmp_path / "flips" / "manifest.json").read_text())["removed"] == {"contaminated": 1}


def test_the_curation_page_shows_each_reason_with_removed_images_beside_what_they_repeat(pool, tmp_path):
    from test_report_demo import CHROMIUM, check_in_browser

    out = tmp_path / "curated"
    assert main(["curate", str(pool / "train_shards"), "--out", str(out), "--config", str(pool / "recipe.yaml")]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    page = (out / "curation" / "index.html").read_text()
    for reason, count in manifest["removed"].items():
        assert f"<h2>{reason}: {count} removed" in page
    contaminated = manifest["removed"]["contaminated"]
    near = manifest["removed"]["near_duplicate"]
    # two images per pair for duplicates and look-alikes (the removed one, the one it repeats); one for a filter
    assert page.count("<img ") == 2 * (contaminated + near) + manifest["removed"]["aspect"]
    if CHROMIUM:
        check_in_browser(out / "curation" / "index.html", tmp_path / "curation.png")


def test_a_curate_killed_after_hashing_is_rerun_without_hashing_again(pool, tmp_path, monkeypatch):
    import shutil

    from vitpipe.curate import run as curate_run
    from vitpipe.pipeline import fingerprints

    bare = tmp_path / "bare"  # shards from elsewhere: no manifest, no fingerprints beside them
    bare.mkdir()
    for tar in sorted((pool / "train_shards").glob("*.tar")):
        shutil.copyfile(tar, bare / tar.name)
    before = {p.name: p.read_bytes() for p in bare.iterdir()}

    def killed(*args, **kwargs):
        raise SystemExit(137)  # dies while copying, after pass 1 hashed everything

    monkeypatch.setattr(curate_run, "_write_kept", killed)
    assert main(["curate", str(bare), "--out", str(tmp_path / "out"), "near_dup.radius=4"]) != 0
    assert list(tmp_path.glob(".curate-fingerprints-out/*.fp.npz"))  # what the killed one hashed is kept
    monkeypatch.undo()

    def no_hashing(image):
        raise AssertionError("hashed twice")

    monkeypatch.setattr(curate_run, "of_image", no_hashing)
    monkeypatch.setattr(fingerprints, "of_image", no_hashing)
    assert main(["curate", str(bare), "--out", str(tmp_path / "out"), "near_dup.radius=4"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rows"] == manifest["written"] + sum(manifest["removed"].values()) == 51
    assert {p.name: p.read_bytes() for p in bare.iterdir()} == before  # the input is only read
    assert not list(tmp_path.glob(".curate-fingerprints-*")) and not list(tmp_path.glob(".tmp-curate-*"))


def test_a_recipe_that_removes_everything_is_warned(pool, tmp_path, capsys):
    against = f"decontaminate.against=[{pool / 'train_shards'}]"
    assert main(["curate", str(pool / "train_shards"), "--out", str(tmp_path / "o"), against]) == 0
    captured = capsys.readouterr()
    assert "kept 0" in captured.out and "removed every sample" in captured.err
