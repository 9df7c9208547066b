"""vitpipe.atomic: the one way files another process may read are written."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from vitpipe.atomic import write_bytes_atomic, writing


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "index.faiss"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with writing(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("the library failed mid-write")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["index.faiss"]
    with writing(tmp_path / "sub" / "x.bin") as tmp:
        tmp.write_bytes(b"new")
    assert (tmp_path / "sub" / "x.bin").read_bytes() == b"new"


def _writer(path, byte, rounds):
    for _ in range(rounds):
        write_bytes_atomic(path, bytes([byte]) * 200_000)


def test_two_writers_at_once_a_reader_sees_one_whole_file(tmp_path):
    target = tmp_path / "run.json"
    write_bytes_atomic(target, b"a" * 200_000)
    context = mp.get_context("spawn")
    writers = [context.Process(target=_writer, args=(target, byte, 40)) for byte in (ord("b"), ord("c"))]
    for writer in writers:
        writer.start()
    seen = set()
    while any(writer.is_alive() for writer in writers):
        data = target.read_bytes()
        assert len(data) == 200_000 and len(set(data)) == 1  # never a part, never a mix
        seen.add(data[0])
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    assert not [p for p in tmp_path.iterdir() if p.name != "run.json"]  # no temp file left


def test_files_libraries_write_get_the_umasks_mode_runs_included(tmp_path):
    """safetensors' save_file makes 0600 files: the encoder, a checkpoint's weights and anything
    written through ``writing`` must be readable as open() would have made them."""
    import os

    import torch
    from safetensors.torch import save_file
    from test_models import TINY

    from vitpipe.cli import main
    from test_loader import write_shards

    mask = os.umask(0o022)
    os.umask(mask)
    ordinary = 0o666 & ~mask
    with writing(tmp_path / "w.safetensors") as tmp:
        save_file({"a": torch.zeros(2)}, tmp)
    run = tmp_path / "run"
    assert main(["pretrain", "mae", "--data", str(write_shards(tmp_path / "shards", sizes=[16])), "--out", str(run),
                 *TINY, "train.batch_size=8", "train.max_steps=1", "data.num_workers=0"]) == 0
    for path in [tmp_path / "w.safetensors", run / "encoder.safetensors",
                 *run.glob("checkpoints/step_*/model.safetensors"), *run.glob("checkpoints/step_*/optimizer.pt")]:
        assert os.stat(path).st_mode & 0o777 == ordinary, path
    assert len(list(run.glob("checkpoints/step_*/model.safetensors"))) == 1
