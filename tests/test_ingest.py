"""Ingest from every source kind into the one shard format, with full accounting."""

import gzip
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FAILURE_ROUTES, encode_image, make_image, write_image_folder
from vitpipe.cli import main
from vitpipe.config import IngestConfig
from vitpipe.pipeline.ingest import ingest
from vitpipe.pipeline.tario import iter_tar_samples
from vitpipe.pipeline.verify import verify


def read_all(directory: Path) -> dict[str, dict[str, bytes]]:
    samples = {}
    for shard in sorted(directory.glob("*.tar")):
        with open(shard, "rb") as handle:
            for sample in iter_tar_samples(handle):
                samples[sample["__key__"]] = sample
    return samples


def assert_accounting(manifest):
    assert manifest["rows"] == (manifest["written"] + manifest["failed"] + sum(manifest["filtered"].values())
                                + manifest["duplicates"])
    assert manifest["failed"] == sum(manifest["failures"].values())


def web_config(**kw):
    base = dict(caption_col="caption", timeout=1.5, max_pixels=1_000_000, max_download_bytes=1_000_000,
                image_size=16, shard_size=6, threads=8, allow_networks=["127.0.0.1/32"])
    return IngestConfig(**{**base, **kw})


def test_url_list_through_img2dataset(tmp_path, url_list):
    manifest = ingest(str(url_list), tmp_path / "out", web_config(), progress=False)
    assert_accounting(manifest)
    assert manifest["written"] == 17 and manifest["duplicates"] == 1
    expected = {}
    for reason in list(FAILURE_ROUTES.values()) + ["bad_scheme", "bad_scheme"]:
        expected[reason] = expected.get(reason, 0) + 1
    assert manifest["failures"] == expected
    samples = read_all(tmp_path / "out")
    assert len(samples) == 17
    for sample in samples.values():
        assert sample["txt"].decode().startswith("a photo number")
        image = Image.open(__import__("io").BytesIO(sample["jpg"]))
        assert image.mode in ("RGB", "L") and max(image.size) == 16  # greyscale stays greyscale
        meta = json.loads(sample["json"])
        assert meta["source"].startswith("http://127.0.0.1") and len(meta["sha256"]) == 64
    assert verify(tmp_path / "out").ok
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sum(sizes.values()) == 17


def test_url_ingest_in_a_pipe_prints_only_vitpipe_output(tmp_path, image_server):
    """Piped (a scheduler log): img2dataset's progress bars and bandwidth prints, its workers' too,
    go to the work folder's log; what reaches the pipe is vitpipe's own summary."""
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"{image_server}/img/{i}.png\n" for i in range(4)))
    result = subprocess.run([sys.executable, "-m", "vitpipe", "ingest", str(urls), "--out", str(tmp_path / "out"),
                             "allow_networks=127.0.0.1/32", "--processes", "1", "--threads", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout + result.stderr
    assert "it/s" not in printed and "bandwidth" not in printed.lower() and "%|" not in printed
    assert "written" in result.stdout
    assert "bandwidth" in (tmp_path / "out" / "_work" / "img2dataset.log").read_text()  # where it went


@pytest.mark.parametrize("suffix", [".tsv", ".jsonl", ".parquet", ".txt", ".csv.gz"])
def test_url_list_formats(tmp_path, image_server, suffix):
    urls = [f"{image_server}/img/{i}.png" for i in range(4)]
    path = tmp_path / f"list{suffix}"
    if suffix == ".tsv":
        path.write_text("url\tcaption\n" + "".join(f"{u}\tcap {i}\n" for i, u in enumerate(urls)))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps({"url": u, "caption": f"cap {i}"}) + "\n" for i, u in enumerate(urls)))
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"url": urls, "caption": [f"cap {i}" for i in range(4)]}), path)
    elif suffix == ".txt":
        path.write_text("\n".join(urls) + "\n")
    else:
        path.write_bytes(gzip.compress(("url,caption\n" + "".join(f"{u},cap {i}\n" for i, u in enumerate(urls))).encode()))
    config = web_config(caption_col=None if suffix == ".txt" else "caption")
    manifest = ingest(str(path), tmp_path / "out", config, progress=False)
    assert manifest["written"] == 4 and manifest["failed"] == 0


def test_image_folder_labels_captions_and_bad_files(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=3, classes=("cat", "dog"))
    (root / "cat" / "0.txt").write_text("a cat")
    (root / "dog" / "notes.md").write_text("not an image")
    (root / "dog" / "zero.png").write_bytes(b"")
    (root / "dog" / "broken.png").write_bytes(encode_image(make_image(7))[:60])
    make_image(9, mode="CMYK").save(root / "dog" / "cmyk.jpg")
    make_image(0).save(root / "dog" / "dup.png")  # same pixels as cat/0.png
    (root / "dog" / "bark.wav").write_bytes(b"RIFF....WAVE")
    (root / "dog" / "logo.svg").write_text("<svg/>")
    make_image(11).save(root / "dog" / "LOUD.JPG")
    (root / "dog" / "LOUD.txt").write_text("a loud dog")  # a sidecar of an upper-case .JPG: never a row
    (root / "dog" / "garbage.png").write_bytes(b"not a png at all")
    manifest = ingest(str(root), tmp_path / "out", IngestConfig(shard_size=4), progress=False)
    assert_accounting(manifest)
    assert manifest["label_map"] == {"cat": 0, "dog": 1}
    assert manifest["failures"] == {"empty_file": 1, "not_an_image": 1, "truncated_image": 1}  # garbage.png
    assert manifest["filtered"] == {"skipped_non_image": 3}  # notes.md, bark.wav, logo.svg: not failures
    assert manifest["duplicates"] == 1 and manifest["written"] == 8 and manifest["rows"] == 15
    assert read_all(tmp_path / "out")["dog_LOUD"]["txt"] == b"a loud dog"
    samples = read_all(tmp_path / "out")
    assert samples["cat_0"]["txt"] == b"a cat" and samples["cat_0"]["cls"] == b"0"
    assert samples["dog_cmyk"]["cls"] == b"1"
    assert Image.open(__import__("io").BytesIO(samples["dog_cmyk"]["png"])).mode == "RGB"


@pytest.mark.parametrize("background,expected", [("white", (255, 255, 255)), ("black", (0, 0, 0)),
                                                 ("#808080", (128, 128, 128))])
def test_transparent_pixels_land_on_the_chosen_background(tmp_path, background, expected):
    """Clip-art is mostly transparent: what those pixels become must be the user's choice, never
    whatever RGB values the transparent pixels happen to hold."""
    pixels = np.zeros((8, 8, 4), dtype=np.uint8)
    pixels[..., :3] = (10, 200, 30)  # hidden colour under alpha 0
    pixels[2:6, 2:6] = (200, 0, 0, 255)
    (tmp_path / "art").mkdir()
    Image.fromarray(pixels, "RGBA").save(tmp_path / "art" / "red_square.png")
    ingest(str(tmp_path / "art"), tmp_path / "out", IngestConfig(background=background), progress=False)
    image = np.asarray(Image.open(__import__("io").BytesIO(read_all(tmp_path / "out")["red_square"]["png"])))
    assert tuple(image[0, 0]) == expected and tuple(image[3, 3]) == (200, 0, 0)


@pytest.mark.parametrize("background,expected", [("white", (255, 255, 255)), ("#808080", (128, 128, 128))])
def test_letterbox_and_colour_key_transparency_use_the_background_too(tmp_path, background, expected):
    """A wide clip-art image padded to a square: the bars are the background colour (img2dataset pads
    URL images with white), not black; an RGB PNG whose tRNS colour key marks pixels transparent
    gets them composited like an alpha channel."""
    (tmp_path / "art").mkdir()
    wide = Image.new("RGB", (16, 8), (200, 0, 0))
    wide.save(tmp_path / "art" / "wide.png")
    keyed = Image.new("RGB", (8, 8), (0, 0, 0))
    keyed.paste((0, 0, 255), (2, 2, 6, 6))
    keyed.save(tmp_path / "art" / "keyed.png", transparency=(0, 0, 0))
    ingest(str(tmp_path / "art"), tmp_path / "out", IngestConfig(background=background, image_size=16,
                                                                  resize_mode="border"), progress=False)
    samples = read_all(tmp_path / "out")
    padded = np.asarray(Image.open(__import__("io").BytesIO(samples["wide"]["png"])).convert("RGB"))
    assert tuple(padded[0, 8]) == expected and tuple(padded[8, 8]) == (200, 0, 0)
    keyed_out = np.asarray(Image.open(__import__("io").BytesIO(samples["keyed"]["png"])).convert("RGB"))
    assert tuple(keyed_out[0, 0]) == expected and tuple(keyed_out[8, 8]) == (0, 0, 255)


def test_background_is_checked_and_refused_where_it_cannot_be_honoured(tmp_path, url_list, capsys):
    assert main(["ingest", str(tmp_path), "--out", str(tmp_path / "o"), "background=not-a-colour"]) == 2
    assert "ingest.background" in capsys.readouterr().err
    assert main(["ingest", str(url_list), "--out", str(tmp_path / "web"), "background=black"]) == 2
    assert "composites transparency on white only" in capsys.readouterr().err


def test_filters_and_val_split(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(40):
        make_image(i, size=24).save(root / f"{i}.png")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "small.png")
    Image.new("RGB", (90, 10), (4, 5, 6)).save(root / "wide.png")
    config = IngestConfig(min_size=10, max_aspect=3.0, val_fraction=0.25, seed=1, shard_size=8)
    manifest = ingest(str(root), tmp_path / "out", config, progress=False)
    assert_accounting(manifest)
    assert manifest["filtered"] == {"max_aspect": 1, "min_size": 1}
    train, val = read_all(tmp_path / "out" / "train"), read_all(tmp_path / "out" / "val")
    assert len(train) + len(val) == 40 and 4 <= len(val) <= 18 and not set(train) & set(val)
    again = ingest(str(root), tmp_path / "out2", config, progress=False)
    assert again["splits"]["val"]["written"] == len(val)  # split is stable


def test_idx_and_hf_sources(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, size=(10, 8, 8), dtype=np.uint8)
    labels = np.arange(10, dtype=np.uint8) % 3
    def idx(array, path):
        header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        path.write_bytes(gzip.compress(header + array.tobytes()))
    idx(images, tmp_path / "img.gz")
    idx(labels, tmp_path / "lab.gz")
    manifest = ingest(f"idx:{tmp_path / 'img.gz'},{tmp_path / 'lab.gz'}", tmp_path / "idx_out", IngestConfig(),
                      progress=False)
    assert manifest["written"] == 10
    samples = read_all(tmp_path / "idx_out")
    assert [int(samples[k]["cls"]) for k in sorted(samples)] == labels.tolist()
    pixels = np.asarray(Image.open(__import__("io").BytesIO(samples["000003"]["png"])))
    assert np.array_equal(pixels, images[3])

    import datasets
    ds = datasets.Dataset.from_dict({"image": [make_image(i) for i in range(5)], "label": [0, 1, 0, 1, 1],
                                     "text": [f"t{i}" for i in range(5)]}, features=datasets.Features({
        "image": datasets.Image(), "label": datasets.Value("int64"), "text": datasets.Value("string")}))
    ds.save_to_disk(tmp_path / "hf")
    manifest = ingest(f"hf:{tmp_path / 'hf'}", tmp_path / "hf_out", IngestConfig(text_col="text"), progress=False)
    assert manifest["written"] == 5
    samples = read_all(tmp_path / "hf_out")
    assert samples["000000004"]["txt"] == b"t4" and samples["000000004"]["cls"] == b"1"


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist")
def test_fashion_mnist_keeps_official_split(tmp_path):
    manifest = ingest("fashion-mnist:test", tmp_path / "fm", IngestConfig(shard_size=4000), progress=False)
    assert manifest["written"] == 10_000 and len(manifest["label_map"]) == 10
    assert verify(tmp_path / "fm").ok


def test_rerun_is_safe_and_overwrite_protected(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    first = ingest(str(root), out, IngestConfig(shard_size=2), progress=False)
    again = ingest(str(root), out, IngestConfig(shard_size=2), progress=False)
    assert again.get("resumed_nothing_to_do") and again["written"] == first["written"]
    assert main(["ingest", str(root), "--out", str(out), "--shard-size", "3"]) == 2
    assert main(["ingest", str(root), "--out", str(out), "--shard-size", "3", "--overwrite"]) == 0
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "keep.txt").write_text("mine")
    assert main(["ingest", str(root), "--out", str(stranger), "--overwrite"]) == 2
    assert (stranger / "keep.txt").exists()


@pytest.mark.parametrize("args,message", [
    (["ingest", "/nope/list.csv", "--out", "X"], "URL list not found"),
    (["ingest", "EMPTY", "--out", "X"], "empty"),
    (["ingest", "NOCOL", "--out", "X"], "no column 'url'"),
    (["ingest", "WEIRD", "--out", "X"], "unknown source format"),
    (["ingest", "/nope/dir/", "--out", "X"], "not found"),
])
def test_bad_sources_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "nocol.csv").write_text("link,caption\nhttp://127.0.0.1/a.png,x\n")
    (tmp_path / "weird.xyz").write_text("x")
    replace = {"EMPTY": str(tmp_path / "empty.csv"), "NOCOL": str(tmp_path / "nocol.csv"),
               "WEIRD": str(tmp_path / "weird.xyz"), "X": str(tmp_path / "out")}
    assert main([replace.get(a, a) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


RESUME_SCRIPT = """
import sys, time
from vitpipe.pipeline import ingest as ingest_mod
from vitpipe.config import IngestConfig
original = ingest_mod.SplitWriter.flush
def slow_flush(self):
    original(self)
    print("flushed", flush=True)
    time.sleep(0.3)
ingest_mod.SplitWriter.flush = slow_flush
if __name__ == "__main__":
    ingest_mod.ingest(sys.argv[1], sys.argv[2], IngestConfig(shard_size=3), progress=False)
"""


def test_kill_9_then_rerun_finishes_missing_shards_only(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(30):
        make_image(i).save(root / f"{i:02d}.png")
    reference = ingest(str(root), tmp_path / "ref", IngestConfig(shard_size=3), progress=False)
    script = tmp_path / "slow_ingest.py"
    script.write_text(RESUME_SCRIPT)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(out)], stdout=subprocess.PIPE, text=True)
    for _ in range(3):
        assert proc.stdout.readline().strip() == "flushed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert 3 <= len(before) < 10
    manifest = ingest(str(root), out, IngestConfig(shard_size=3), progress=False)
    split = manifest["splits"]["train"]
    assert split["shards_reused"] == len(before)
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in before.items())
    assert set(read_all(out)) == set(read_all(tmp_path / "ref")) and manifest["written"] == reference["written"]
    assert verify(out).ok


def test_url_ingest_resumes_after_kill(tmp_path, image_server, monkeypatch):
    import vitpipe.pipeline.ingest as ingest_module

    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"{image_server}/img/{i}.png\n" for i in range(20)))
    config = web_config(caption_col=None, shard_size=5)
    reference = ingest(str(urls), tmp_path / "ref", config, progress=False)
    assert not (tmp_path / "ref" / "_work" / "img2dataset").exists()  # removed once complete
    out, real_finish = tmp_path / "out", ingest_module._finish

    def killed(*_):  # the kill lands before the manifest, after the shards
        raise KeyboardInterrupt

    monkeypatch.setattr(ingest_module, "_finish", killed)
    with pytest.raises(KeyboardInterrupt):
        ingest(str(urls), out, config, progress=False)
    # and img2dataset had finished only two of its shards: drop the rest and our outputs
    work = out / "_work" / "img2dataset"
    for path in list(work.glob("0000[23]*")) + list(out.glob("*.tar")):
        path.unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in work.glob("0000[01].tar")}
    at_finish = {}

    def finish(out_dir, manifest):
        at_finish.update({p.name: p.stat().st_mtime_ns for p in work.glob("0000[01].tar")})
        real_finish(out_dir, manifest)

    monkeypatch.setattr(ingest_module, "_finish", finish)
    manifest = ingest(str(urls), out, config, progress=False)
    assert at_finish == kept and len(kept) == 2  # not downloaded again
    assert set(read_all(out)) == set(read_all(tmp_path / "ref")) and manifest["written"] == reference["written"] == 20
    assert not work.exists()


def test_val_fraction_carves_from_an_official_train_split_only():
    """`fashion-mnist:train --val-fraction 0.1` promised train/ and val/; train samples that came with
    their split named were never carved before. A test split stays whole."""
    from vitpipe.pipeline.ingest import Accounts
    from vitpipe.pipeline.sources import Sample

    accounts, config = Accounts(), IngestConfig(val_fraction=0.5, dedup=False)
    def split(key, name):
        return accounts.split_of(Sample(key, b"", "png", key, (8, 8), split=name), config)
    train = [split(f"train_{i}", "train") for i in range(200)]
    assert 60 < train.count("val") < 140 and set(train) == {"train", "val"}
    assert {split(f"test_{i}", "test") for i in range(50)} == {"test"}
    assert {split(f"x_{i}", None) for i in range(50)} == {"train", "val"}


@pytest.mark.parametrize("source", ["folder", "idx"])
def test_every_shard_holds_a_mix_of_classes(tmp_path, source):
    """Folders and IDX files list samples class by class; written in that order, shard 0 held one
    class only. Shuffled (seeded) at ingest, each shard's label histogram is close to the dataset's."""
    classes = ("a", "b", "c", "d")
    if source == "folder":
        spec = str(write_image_folder(tmp_path / "imgs", per_class=50, classes=classes))
    else:
        labels = np.repeat(np.arange(4, dtype=np.uint8), 50)
        images = np.random.default_rng(0).integers(0, 255, size=(200, 8, 8), dtype=np.uint8)
        for array, name in ((images, "img.gz"), (labels, "lab.gz")):
            header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            (tmp_path / name).write_bytes(gzip.compress(header + array.tobytes()))
        spec = f"idx:{tmp_path / 'img.gz'},{tmp_path / 'lab.gz'}"
    manifest = ingest(spec, tmp_path / "out", IngestConfig(shard_size=50), progress=False)
    assert manifest["settings"]["shuffle"] is True
    for shard in sorted((tmp_path / "out").glob("*.tar")):
        with open(shard, "rb") as handle:
            labels_in_shard = [int(s["cls"]) for s in iter_tar_samples(handle)]
        counts = np.bincount(labels_in_shard, minlength=4)
        assert len(labels_in_shard) == 50 and counts.min() >= 5 and counts.max() <= 22, (shard.name, counts)
    ingest(spec, tmp_path / "again", IngestConfig(shard_size=50), progress=False)
    assert list(read_all(tmp_path / "again")) == list(read_all(tmp_path / "out"))  # seeded: the same order


def test_a_second_ingest_into_the_same_out_is_refused_while_the_first_runs(tmp_path, capsys):
    """Two at once collided on the shards' temp files: one died with FileNotFoundError. The lock
    lies beside --out (an --out must hold only an ingest) and is gone when the first finishes."""
    from vitpipe.locks import DirLock

    folder, out = write_image_folder(tmp_path / "imgs"), tmp_path / "out"
    first = DirLock(tmp_path / ".out.ingest.lock", out, "held by the test")  # the running ingest's lock
    first.acquire()
    assert main(["ingest", str(folder), "--out", str(out)]) == 2
    assert "is being written by pid" in capsys.readouterr().err and not out.exists()
    first.release()
    assert main(["ingest", str(folder), "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "out"]
