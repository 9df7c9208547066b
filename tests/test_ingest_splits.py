"""A URL list's own split column: each split to OUT/<split>/, a test split kept whole."""

import json

import pytest

from conftest import write_image_folder
from test_ingest import assert_accounting, read_all
from vitpipe.cli import main


def write_list(path, image_server, rows):
    lines = ["url,caption,label,split"] + [f"{image_server}/img/{i}.png,photo {i},{label},{split}"
                                           for i, label, split in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_split_column_writes_each_split_and_keeps_the_test_split_whole(tmp_path, image_server):
    rows = [(0, 0, "train"), (1, 1, "train"), (2, 0, "train"), (2, 0, "train"),  # a train duplicate: removed
            (3, 1, ""),  # an empty cell is train
            (4, 1, "test"), (4, 1, "test"), (0, 0, "test"),  # test copies (of itself, of train): all kept
            (5, 0, "../escape"), (6, 0, "_work")]  # not folder names: failed rows, never paths
    urls = write_list(tmp_path / "urls.csv", image_server, rows)
    out = tmp_path / "out"
    code = main(["ingest", str(urls), "--out", str(out), "--caption-col", "caption", "--split-col", "split",
                 "--shard-size", "2", "--threads", "4", "image_size=16", "allow_networks=127.0.0.1/32"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert_accounting(manifest)
    assert manifest["failures"] == {"bad_split": 2} and manifest["duplicates"] == 1
    assert {name: split["written"] for name, split in manifest["splits"].items()} == {"train": 4, "test": 3}
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("_")) == ["test", "train"]
    test = read_all(out / "test")
    assert sorted(int(s["cls"]) for s in test.values()) == [0, 1, 1]
    assert sorted(s["txt"].decode() for s in read_all(out / "train").values()) == ["photo 0", "photo 1", "photo 2",
                                                                                    "photo 3"]
    assert not (out / "escape").exists() and not (tmp_path / "escape").exists()


def test_split_column_is_refused_where_it_cannot_be_honoured(tmp_path, image_server, capsys):
    urls = write_list(tmp_path / "urls.csv", image_server, [(0, 0, "train")])
    code = main(["ingest", str(urls), "--out", str(tmp_path / "a"), "--split-col", "fold",
                 "allow_networks=127.0.0.1/32"])
    assert code == 2 and "no column 'fold'" in capsys.readouterr().err
    plain = tmp_path / "urls.txt"
    plain.write_text(f"{image_server}/img/0.png\n")
    assert main(["ingest", str(plain), "--out", str(tmp_path / "t"), "--split-col", "split"]) == 2
    assert "a .txt URL list has no columns; drop --split-col" in capsys.readouterr().err
    folder = write_image_folder(tmp_path / "images")
    code = main(["ingest", str(folder), "--out", str(tmp_path / "b"), "--split-col", "split"])
    assert code == 2 and "split_col is for URL lists" in capsys.readouterr().err
    assert not (tmp_path / "b" / "manifest.json").exists()


@pytest.mark.parametrize("value", ["", "train"])
def test_a_list_of_one_split_still_gets_the_split_layout(tmp_path, image_server, value):
    """The layout follows the setting, not the data: with split_col, shards are under OUT/<split>/."""
    urls = write_list(tmp_path / "urls.csv", image_server, [(0, 0, value), (1, 1, value)])
    code = main(["ingest", str(urls), "--out", str(tmp_path / "out"), "--split-col", "split", "image_size=16",
                 "allow_networks=127.0.0.1/32"])
    assert code == 0
    assert len(list((tmp_path / "out" / "train").glob("*.tar"))) == 1 and not list((tmp_path / "out").glob("*.tar"))
