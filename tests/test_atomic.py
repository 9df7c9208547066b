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
