"""`ingest distributor=pyspark` on a real Spark (local[2], a JVM, Python workers) against the
loopback image server: the same shards, bytes and accounting as the local ingest."""

import io
import json
import shutil
import sys

import pytest
from PIL import Image

from conftest import FAILURE_ROUTES
from test_ingest import assert_accounting, web_config
from vitpipe.cli import main
from vitpipe.pipeline import ingest as ingest_module
from vitpipe.pipeline.ingest import ingest

pyspark = pytest.importorskip("pyspark", reason="pip install 'vitpipe[spark]'")

COUNTS = ("rows", "written", "failed", "failures", "filtered", "duplicates", "failure_examples")


def spark_config(**kw):
    return web_config(distributor="pyspark", spark_master="local[2]", **kw)


def shard_files(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.tar"))}


def with_split_column(url_list, path):
    """The list with a split column: every 4th row (from the third) test, one row a bad name."""
    header, *rows = url_list.read_text().splitlines()
    lines = [header + ",split"] + [f"{row},{'test' if i % 4 == 2 else 'train'}" for i, row in enumerate(rows)]
    path.write_text("\n".join([*lines, rows[0] + ",../up"]) + "\n")
    return path


def test_spark_ingest_writes_what_the_local_ingest_writes(tmp_path, url_list):
    """Dedup (the duplicate of image 3 sits in a later downloaded shard), the list's own split
    column and the val split carved from its train rows, every failure reason (SSRF refusals and
    the pixel bound applied on the executors) and the re-sharding must come out byte for byte as
    in local mode."""
    url_list = with_split_column(url_list, tmp_path / "split.csv")
    local = ingest(str(url_list), tmp_path / "local", web_config(val_fraction=0.3, split_col="split"), progress=False)
    spark = ingest(str(url_list), tmp_path / "spark", spark_config(val_fraction=0.3, split_col="split"), progress=False)
    assert_accounting(spark)
    assert {k: spark[k] for k in COUNTS} == {k: local[k] for k in COUNTS}
    assert spark["duplicates"] == 1 and set(spark["failures"]) >= set(FAILURE_ROUTES.values()) - {"too_many_pixels"}
    assert spark["failures"]["too_many_pixels"] == 1 and spark["failures"]["bad_scheme"] == 2
    assert spark["failures"]["bad_split"] == 1
    assert set(spark["splits"]) == {"train", "val", "test"} and spark["splits"]["test"]["written"] >= 3
    for split in ("train", "val", "test"):
        for name in ("shards", "written"):
            assert spark["splits"][split][name] == local["splits"][split][name]
        assert (json.loads((tmp_path / "spark" / split / "sizes.json").read_text())
                == json.loads((tmp_path / "local" / split / "sizes.json").read_text()))
    assert shard_files(tmp_path / "spark") == shard_files(tmp_path / "local")
    for out in ("local", "spark"):  # img2dataset's copy is gone once the shards are complete
        assert not (tmp_path / out / "_work" / "img2dataset").exists()


def test_spark_ingest_resumes_after_a_kill(tmp_path, url_list, monkeypatch):
    """Killed after some final shards and before the manifest: the rerun downloads only the
    downloaded shards that are missing and writes only the final shards that are missing."""
    config = spark_config(shard_size=4)
    reference = ingest(str(url_list), tmp_path / "ref", web_config(shard_size=4), progress=False)
    out = tmp_path / "out"

    def killed(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(ingest_module, "_finish", killed)
    with pytest.raises(KeyboardInterrupt):
        ingest(str(url_list), out, config, progress=False)
    monkeypatch.undo()
    work = out / "_work" / "img2dataset"
    for path in list(work.glob("0000[23]*")) + [out / "00001.tar", out / "00003.tar"]:
        path.unlink()
    kept_downloads = {p.name: p.stat().st_mtime_ns for p in work.glob("0000[01].tar")}
    kept_shards = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    downloads_at_finish = {}

    def finish(out_dir, manifest):  # look at img2dataset's shards before they are removed
        downloads_at_finish.update({p.name: p.stat().st_mtime_ns for p in work.glob("0000[01].tar")})
        real_finish(out_dir, manifest)

    real_finish = ingest_module._finish
    monkeypatch.setattr(ingest_module, "_finish", finish)
    manifest = ingest(str(url_list), out, config, progress=False)
    assert downloads_at_finish == kept_downloads and len(kept_downloads) == 2  # not downloaded again
    assert manifest["splits"]["train"]["shards_reused"] == len(kept_shards) == 3
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in kept_shards.items())
    assert not work.exists()
    assert shard_files(out) == shard_files(tmp_path / "ref")
    assert {k: manifest[k] for k in COUNTS} == {k: reference[k] for k in COUNTS}


def test_without_spark_one_line_and_nothing_written(tmp_path, url_list, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyspark", None)
    assert main(["ingest", str(url_list), "--out", str(tmp_path / "out"), "distributor=pyspark"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'vitpipe[spark]'" in err and "openjdk" in err
    assert not (tmp_path / "out").exists()
    monkeypatch.delitem(sys.modules, "pyspark")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    assert main(["ingest", str(url_list), "--out", str(tmp_path / "out"), "distributor=pyspark"]) == 2
    assert not (tmp_path / "out").exists()


def test_spark_mode_refuses_sources_it_does_not_distribute(tmp_path, capsys):
    from conftest import write_image_folder

    folder = write_image_folder(tmp_path / "imgs")
    assert main(["ingest", str(folder), "--out", str(tmp_path / "out"), "distributor=pyspark"]) == 2
    assert "drop distributor=pyspark" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_pixel_bound_refuses_before_decoding():
    """The header says 3000 x 3000: img2dataset's resizer (which decodes) is never called."""
    from vitpipe.pipeline.bounded_downloader import PixelBound

    calls = []
    bound = PixelBound(lambda stream, *a: calls.append(stream) or ("ok",), max_pixels=1_000_000)
    big, small = io.BytesIO(), io.BytesIO()
    Image.new("L", (3000, 3000)).save(big, "PNG")
    Image.new("L", (100, 100)).save(small, "PNG")
    assert bound(big)[-1] == "image area too large" and not calls
    assert bound(small) == ("ok",) and calls[0].tell() == 0  # handed over rewound
    assert shutil.which("java"), "the Spark tests need a JRE: scripts/setup.sh installs one"
