"""The report renders in a real browser with every image loaded; the demo runs end to end."""

import json
import shutil
from pathlib import Path

import pytest

from vitpipe.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


VIEWPORTS = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}


def check_in_browser(page_path: Path, screenshot: Path) -> None:
    """Every image loads, no console error, and at a phone's width nothing is wider than the screen
    (wide tables scroll inside their box); a full-page screenshot per width beside ``screenshot``."""
    playwright = pytest.importorskip("playwright.sync_api")
    errors: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        for name, viewport in VIEWPORTS.items():
            page = browser.new_page(viewport=viewport)
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("requestfailed", lambda request: errors.append(f"failed: {request.url}"))
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images).map(i => [i.src, i.complete && i.naturalWidth > 0])")
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            page.screenshot(path=str(screenshot.with_name(f"{screenshot.stem}-{name}.png")), full_page=True)
            page.close()
            assert images and all(ok for _, ok in images), images
            assert overflow <= 1, f"{name}: the page is {overflow} px wider than the screen"
        browser.close()
    assert not errors, errors


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (scripts/setup.sh installs it)")
def test_report_page_loads_every_image(tmp_path, tiny_shards):
    run = tmp_path / "run"
    args = ["model.size=micro", "data.image_size=16", "mae.decoder_dim=32", "mae.decoder_heads=2",
            "mae.decoder_depth=1", "train.batch_size=8", "train.max_steps=4", "data.num_workers=0",
            "train.tensorboard=false", "train.log_every=1"]
    assert main(["pretrain", "mae", "--data", str(tiny_shards), "--out", str(run), *args]) == 0
    assert main(["eval", "retrieval", str(run), "--index", str(tiny_shards), "--workers", "0"]) == 0
    # a probe over blocks with their concatenation (what the demo runs): the curve draws the single blocks
    assert main(["eval", "linear-probe", str(run), "--train", str(tiny_shards), "--test", str(tiny_shards),
                 "--workers", "0", "--epochs", "2", "--layers", "0,1", "--concat", "--max-contamination", "1"]) == 0
    assert main(["report", str(run)]) == 0
    page = run / "report" / "index.html"
    text = page.read_text()
    assert "layer_probe.png" in text and "the blocks side by side" in text
    for section in ("MAE reconstructions", "CLS attention", "Position embeddings", "Attention distance", "Retrieval",
                    "Linear probe by layer"):
        assert section in text
    assert "http://" not in text and "https://" not in text  # no network assets
    assert "Resolved config" in text and "rows / written" in text and "pretrained vs baselines" in text
    check_in_browser(page, tmp_path / "report.png")
    artifacts = Path(__file__).parent.parent / "test-artifacts"  # kept by CI, ignored by git
    artifacts.mkdir(exist_ok=True)
    for name in VIEWPORTS:
        shutil.copy(tmp_path / f"report-{name}.png", artifacts / f"report-{name}.png")


def test_report_marks_a_pretrained_encoder_worse_than_its_baseline(tmp_path):
    from vitpipe.report.html import _eval_rows

    (tmp_path / "eval").mkdir()
    for name, baseline, top1 in (("knn", None, 0.60), ("knn.random", "random-init", 0.65),
                                 ("knn.pixels", "raw-pixels", 0.50)):
        (tmp_path / "eval" / f"{name}.json").write_text(json.dumps({"task": "knn", "baseline": baseline,
                                                                     "top1": top1}))
    rows = {row["baseline"]: row for row in _eval_rows(tmp_path)}
    assert rows["pretrained"]["worse"] and "-0.050 vs random-init (WORSE)" in rows["pretrained"]["versus"]
    assert "+0.100 vs raw-pixels" in rows["pretrained"]["versus"]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (scripts/setup.sh installs it)")
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "shards" / "train").mkdir(parents=True)  # an earlier demo's (the old one-ingest-per-split layout)
    (out / "shards" / "train" / "manifest.json").write_text("{}")
    (out / "demo.json").write_text("{}")
    code = main(["demo", "--out", str(out), "--train-images", "600", "--test-images", "200",
                 "train.max_steps=20", "train.batch_size=32", "model.size=micro", "model.depth=3",
                 "data.num_workers=0"])  # 3 blocks: the demo probes blocks 1-2 and their concatenation
    assert code == 0
    headline = json.loads((out / "demo.json").read_text())
    assert 0 <= headline["linear_probe_top1"] <= 1 and 0 <= headline["knn_top1_random_init"] <= 1
    assert 0 <= headline["retrieval_recall_at_1_random_init"] <= 1  # every headline number beside random init
    timed = [step["command"] for step in headline["steps"]]
    assert timed[0] == "ingest " + str(out / "web" / "images.csv") and "pretrain mae" in timed and timed[-1].startswith("report")
    assert sum(step["seconds"] for step in headline["steps"]) <= headline["seconds"]
    assert headline["test_images"] == 200 and headline["train_images"] == 600
    assert isinstance(headline["test_images_with_a_near_copy"], int)
    summary = capsys.readouterr().out.split("linear probe top-1:")[-1]  # the closing lines say what was measured
    assert f"on 200 test images ({headline['test_images_with_a_near_copy']} with a near-copy" in summary
    assert "fit on 600 train images" in summary
    manifest = json.loads((out / "shards" / "manifest.json").read_text())  # one ingest, a split column
    assert manifest["splits"]["train"]["written"] == 600 and manifest["splits"]["test"]["written"] == 200
    assert manifest["source"]["kind"] == "url_list"
    sample_labels = manifest["splits"]["train"]["shards"][0]["labels"]
    assert sum(sample_labels.values()) == 600  # labels came through the URL list
    assert "the blocks side by side" in (out / "mae" / "report" / "index.html").read_text()
    check_in_browser(out / "mae" / "report" / "index.html", tmp_path / "demo.png")
    artifacts = Path(__file__).parent.parent / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    for name in VIEWPORTS:
        shutil.copy(tmp_path / f"demo-{name}.png", artifacts / f"demo-report-{name}.png")


def test_demo_refuses_a_folder_holding_anything_but_an_earlier_demo(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "web").mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["demo", "--out", str(out)]) == 2
    assert "holds other files (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me" and (out / "web").is_dir()
