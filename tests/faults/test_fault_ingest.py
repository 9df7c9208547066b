"""Reruns of `vitpipe ingest` on a source that changed (issue: faults and hostile input)."""

from __future__ import annotations

import json

from conftest import make_image, write_image_folder
from vitpipe.cli import main


def ingest_folder(root, out, *extra) -> int:
    return main(["ingest", str(root), "--out", str(out), "--shard-size", "4", *extra])


def test_changed_source_is_refused_unless_overwrite(tmp_path, capsys):
    root = write_image_folder(tmp_path / "imgs", per_class=3, classes=("cat", "dog"))
    out = tmp_path / "out"
    assert ingest_folder(root, out) == 0
    assert ingest_folder(root, out) == 0  # unchanged: nothing to do
    assert "nothing to do" in capsys.readouterr().out

    (root / "cat" / "0.txt").write_text("a caption added later")
    assert ingest_folder(root, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the source changed" in err[0] and "--overwrite" in err[0]

    assert ingest_folder(root, out, "--overwrite") == 0
    make_image(77).save(root / "dog" / "new.png")  # an image added
    assert ingest_folder(root, out) == 2
    assert "7 files then, 8 now" in capsys.readouterr().err  # 6 images + a caption, then a new image
    assert ingest_folder(root, out, "--overwrite") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["written"] == 7 and manifest["source_fingerprint"]["files"] == 8


def test_changed_url_list_is_refused(tmp_path, image_server, capsys):
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{image_server}/img/1.png\n")
    out = tmp_path / "out"
    args = ["ingest", str(urls), "--out", str(out), "allow_networks=127.0.0.1/32"]
    assert main(args) == 0
    urls.write_text(f"{image_server}/img/1.png\n{image_server}/img/2.png\n")
    assert main(args) == 2 and "the source changed" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["written"] == 2


def test_source_changed_during_an_interrupted_ingest_is_refused(tmp_path, capsys):
    root = write_image_folder(tmp_path / "imgs", per_class=5, classes=("a",))
    out = tmp_path / "out"
    assert ingest_folder(root, out) == 0
    (out / "manifest.json").unlink()  # as if killed before the manifest was written
    (out / "00001.tar").unlink()
    (root / "a" / "0.png").unlink()
    assert ingest_folder(root, out) == 2 and "the source changed" in capsys.readouterr().err
