"""merge.shardhash: each shard's sha256, hashed from the file as its written prefix grows, is
the sha256 of the finished file, whatever the order the ranges are written in."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from pathlib import Path

import pytest
import torch

from merge import shardhash
from merge.shardhash import ShardHasher
from merge.shardplan import TensorSpec, plan_shards
from merge.writer import ShardWriter


def _file(path: Path, size: int) -> bytes:
    path.write_bytes(b"\0" * size)
    return os.urandom(size)


@pytest.mark.parametrize("block", [7, 64, 4096])
def test_ranges_in_any_order_hash_as_the_finished_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    monkeypatch.setattr(shardhash, "BLOCK", block)  # several reads per range, and across them
    rng = random.Random(block)
    paths, datas = [tmp_path / "a", tmp_path / "b"], []
    for path, size in zip(paths, [1000, 333], strict=True):
        datas.append(_file(path, size))
    hasher = ShardHasher(paths, [1000, 333])
    for i, (path, data) in enumerate(zip(paths, datas, strict=True)):
        cuts = sorted({0, len(data), *rng.sample(range(1, len(data)), 12)})
        ranges = [*zip(cuts[:-1], cuts[1:], strict=True)]
        rng.shuffle(ranges)
        ranges.remove((cuts[0], cuts[1]))  # the first last: every other range waits for it
        ranges += [(cuts[3], cuts[3]), (cuts[0], cuts[1])]  # an empty tensor where one starts
        with open(path, "r+b") as f:
            for start, stop in ranges:
                f.seek(start)
                f.write(data[start:stop])
                f.flush()
                hasher.add(i, start, stop)
    got = hasher.result()
    assert got == {p.name: hashlib.sha256(d).hexdigest() for p, d in zip(paths, datas, strict=True)}


def test_a_file_not_written_whole_is_an_error_and_stop_abandons(tmp_path: Path) -> None:
    path = tmp_path / "a"
    _file(path, 100)
    hasher = ShardHasher([path], [100])
    hasher.add(0, 0, 40)
    hasher.add(0, 50, 100)  # a gap at 40..50: the prefix stops there
    with pytest.raises(RuntimeError, match="not written whole.*'a'"):
        hasher.result()
    other = ShardHasher([path], [100])
    other.add(0, 0, 10)
    other.stop()  # returns; nothing is left running
    assert not any(t.name == "merge-shard-hash" and t.is_alive() for t in threading.enumerate())


def test_the_writer_gives_each_shards_sha256_as_on_disk(tmp_path: Path) -> None:
    """Parts written from two threads, in reverse order within each tensor: the digests the
    writer hands over are those of the files it leaves."""
    specs = [TensorSpec(f"t{i}", (37, 11), torch.float32) for i in range(6)]
    shards = plan_shards(specs, 37 * 11 * 4 * 2)  # 3 shards of 2 tensors
    values = {s.name: torch.randn(37, 11) for s in specs}
    with ShardWriter(tmp_path, shards) as writer:

        def put(names: list[str]) -> None:
            for name in names:
                flat = values[name].reshape(-1)
                for start in reversed(range(0, flat.numel(), 50)):
                    writer.write_part(name, start, flat[start : start + 50])

        threads = [
            threading.Thread(target=put, args=(n,))
            for n in (["t0", "t3", "t4"], ["t5", "t1", "t2"])
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    on_disk = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.glob("*.safetensors")
    }
    assert len(on_disk) == 3
    assert writer.shard_sha256 == on_disk
