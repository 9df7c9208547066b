"""vitpipe shards are WebDataset shards both ways, and the tar reader handles every header kind."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from conftest import encode_image, make_image, write_image_folder
from vitpipe.cli import main
from vitpipe.config import IngestConfig
from vitpipe.pipeline.ingest import ingest
from vitpipe.pipeline.tario import TarFormatError, iter_tar_members, iter_tar_samples


def test_webdataset_reads_every_sample_of_vitpipe_shards(tmp_path):
    import webdataset as wds

    folder = write_image_folder(tmp_path / "imgs", per_class=7, classes=("cat", "dog"))
    (folder / "cat" / "3.txt").write_text("a cat on a mat")
    manifest = ingest(str(folder), tmp_path / "shards", IngestConfig(shard_size=4), progress=False)
    urls = sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == manifest["written"] == 14
    assert {s["__key__"] for s in samples} == {f"{c}_{i}" for c in ("cat", "dog") for i in range(7)}
    by_key = {s["__key__"]: s for s in samples}
    assert by_key["cat_3"]["txt"] == b"a cat on a mat" and by_key["dog_0"]["cls"] == b"1"
    decoded = next(iter(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("png", "cls")))
    assert decoded[0].size == (24, 24) and decoded[1] in (0, 1)
    assert json.loads(by_key["cat_0"]["json"])["sha256"]


def test_vitpipe_trains_and_evaluates_on_webdataset_shardwriter_shards(tmp_path):
    import webdataset as wds

    out = tmp_path / "wds"
    out.mkdir()
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=10) as sink:
        for index in range(30):
            sink.write({"__key__": f"sample{index:04d}", "png": encode_image(make_image(index, size=16)),
                        "cls": index % 2, "txt": f"image {index}"})
    args = ["model.size=micro", "data.image_size=16", "mae.decoder_dim=32", "mae.decoder_heads=2",
            "mae.decoder_depth=1", "train.batch_size=8", "train.max_steps=3", "data.num_workers=0",
            "train.tensorboard=false", "data.samples_per_epoch=24"]  # no sizes.json: say how many
    assert main(["pretrain", "mae", "--data", str(out), "--out", str(tmp_path / "run"), *args]) == 0
    assert main(["eval", "knn", str(tmp_path / "run"), "--train", str(out), "--test", str(out), "--workers", "0",
                 "--max-contamination", "1"]) == 0
    result = json.loads((tmp_path / "run" / "eval" / "knn.json").read_text())
    assert result["train_samples"] == 30 and result["samples"]["train"]["expected"] is None


def tar_bytes(fmt: int, members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


LONG = "deep/" * 30 + "sample_with_a_very_long_name_indeed"  # > 100 characters: needs an extension header


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_in_every_header_format(fmt):
    members = [(f"{LONG}.png", b"image"), (f"{LONG}.txt", "naïve café".encode()), ("short.cls", b"3")]
    if fmt == tarfile.USTAR_FORMAT:  # ustar splits long paths into prefix + name (up to 255)
        members[:2] = [(f"{'d/' * 60}x.png", b"image"), (f"{'d/' * 60}x.txt", b"t")]
    data = tar_bytes(fmt, members)
    assert list(iter_tar_members(io.BytesIO(data))) == members
    samples = list(iter_tar_samples(io.BytesIO(data)))
    assert len(samples) == 2 and samples[1] == {"__key__": "short", "cls": b"3"}


def test_pax_size_and_global_headers_and_non_files_are_handled():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "global header"}) as tar:
        directory = tarfile.TarInfo("a_dir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        link = tarfile.TarInfo("a_link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        info = tarfile.TarInfo("k.png")
        info.size = 5
        info.pax_headers = {"size": "5", "mtime": "1.5"}
        tar.addfile(info, io.BytesIO(b"12345"))
    assert list(iter_tar_members(io.BytesIO(buffer.getvalue()))) == [("k.png", b"12345")]  # links never followed


def test_checksum_mismatch_and_truncation_raise():
    data = bytearray(tar_bytes(tarfile.USTAR_FORMAT, [("a.png", b"x" * 600), ("b.png", b"y")]))
    flipped = bytes(data[:10]) + b"Z" + bytes(data[11:])
    with pytest.raises(TarFormatError, match="checksum"):
        list(iter_tar_members(io.BytesIO(flipped)))
    with pytest.raises(TarFormatError, match="truncated member"):
        list(iter_tar_members(io.BytesIO(bytes(data[:700]))))
    with pytest.raises(TarFormatError, match="truncated header"):
        list(iter_tar_members(io.BytesIO(bytes(data[:1536 + 100]))))
    # cut between two members (a 512-byte boundary, as a block-wise copy stops): no end blocks
    with pytest.raises(TarFormatError, match="end-of-archive"):
        list(iter_tar_members(io.BytesIO(bytes(data[:1536]))))
    assert [name for name, _ in iter_tar_members(io.BytesIO(bytes(data)))] == ["a.png", "b.png"]
