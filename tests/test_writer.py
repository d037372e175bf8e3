"""Shard planning, streamed safetensors writing, atomic output and output checks."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merge.errors import OutputError
from merge.outdir import AtomicOutput, check_disk_space, check_output_location
from merge.shardplan import (
    INDEX_NAME,
    MIN_SHARD_BYTES,
    UNITS_HELP,
    TensorSpec,
    parse_size,
    plan_shards,
)
from merge.writer import ShardWriter


def spec(name: str, *shape: int, dtype: torch.dtype = torch.float32) -> TensorSpec:
    return TensorSpec(name, tuple(shape), dtype)


def specs_of(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


def write_all(directory: Path, tensors: dict[str, torch.Tensor], max_bytes: int) -> None:
    plan = plan_shards(specs_of(tensors), max_bytes)
    with ShardWriter(directory, plan, {"seed": "7"}) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    assert writer.written_bytes == plan.total_bytes


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=g),
        "b.half": torch.randn(7, generator=g).to(torch.float16),
        "c.bf16": torch.randn(2, 3, 3, generator=g).to(torch.bfloat16),
        "d.scalar": torch.tensor(2.5),
        "e.empty": torch.empty(0, 4),
        "f.transposed": torch.randn(4, 3, generator=g).t(),  # not contiguous
        "g.int": torch.arange(5, dtype=torch.int64),
        "h.bool": torch.tensor([True, False, True]),
    }


# --------------------------------------------------------------------------- planning


def test_spec_nbytes() -> None:
    assert spec("x", 3, 5).nbytes == 60
    assert spec("x", 3, 5, dtype=torch.bfloat16).nbytes == 30
    assert spec("x").nbytes == 4  # 0-dim scalar
    assert spec("x", 0, 4).nbytes == 0


def test_plan_greedy_boundaries() -> None:
    # 40, 40, 40, 80 and 20 bytes, max 100: a full shard (100) stays one shard.
    specs = [spec("a", 10), spec("b", 10), spec("c", 10), spec("d", 20), spec("e", 5)]
    plan = plan_shards(specs, 100)
    assert [[t.name for t in s.tensors] for s in plan.shards] == [["a", "b"], ["c"], ["d", "e"]]
    assert [s.nbytes for s in plan.shards] == [80, 40, 100]
    assert plan.total_bytes == 220
    assert [s.filename for s in plan.shards] == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    assert plan.shard_of("d").filename == "model-00003-of-00003.safetensors"
    assert plan.weight_map["b"] == "model-00001-of-00003.safetensors"
    assert list(plan.weight_map) == ["a", "b", "c", "d", "e"]


def test_plan_exact_fit_stays_in_shard() -> None:
    plan = plan_shards([spec("a", 10), spec("b", 15)], 100)
    assert len(plan.shards) == 1
    assert plan.shards[0].filename == "model.safetensors"


def test_plan_oversized_tensor_gets_own_shard() -> None:
    plan = plan_shards([spec("a", 2), spec("big", 100), spec("c", 2)], 40)
    assert [[t.name for t in s.tensors] for s in plan.shards] == [["a"], ["big"], ["c"]]
    alone = plan_shards([spec("big", 100)], 40)
    assert [s.filename for s in alone.shards] == ["model.safetensors"]


def test_plan_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="appears twice"):
        plan_shards([spec("a", 1), spec("a", 1)], 100)
    with pytest.raises(ValueError, match="no tensors"):
        plan_shards([], 100)
    with pytest.raises(ValueError, match="positive"):
        plan_shards([spec("a", 1)], 0)
    with pytest.raises(KeyError, match="not in the shard plan"):
        plan_shards([spec("a", 1)], 100).shard_of("b")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # mergekit's letters: K, M, B (billion, its default shard size is 5B), T; and G
        ("5K", 5 * 10**3),
        ("5M", 5 * 10**6),
        ("5B", 5 * 10**9),
        ("5G", 5 * 10**9),
        ("5T", 5 * 10**12),
        # decimal
        ("100KB", 100_000),
        ("500MB", 500 * 10**6),
        ("5GB", 5 * 10**9),
        ("1TB", 10**12),
        # binary
        ("3KiB", 3 * 2**10),
        ("3MiB", 3 * 2**20),
        ("2GiB", 2 * 2**30),
        ("1TiB", 2**40),
        # any case, decimals, spaces, bare byte counts
        ("5b", 5 * 10**9),
        ("100kb", 100_000),
        ("2gib", 2 * 2**30),
        ("2GIB", 2 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("1.5B", 1_500_000_000),
        (".5MB", 500_000),
        (" 5 GB ", 5 * 10**9),
        ("123", 123),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "x", "5XB", "GB", "-5GB", "0", "0GB", "5 G B", "1e9", "5KIBB", "5Gi", 0, -3]
)
def test_parse_size_errors(text: str | int) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text, "--max-memory")
    assert str(info.value) == (
        f"--max-memory must be a size like 5GB or 500MB, got {str(text)!r}; {UNITS_HELP}"
    )


@pytest.mark.parametrize(
    ("text", "nbytes"), [("1K", "1,000"), ("999KB", "999,000"), ("512KiB", "524,288"), ("64", "64")]
)
def test_parse_size_minimum_names_the_bytes_and_the_units(text: str, nbytes: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text, "--out-shard-size", minimum=MIN_SHARD_BYTES)
    assert str(info.value) == (
        f"--out-shard-size {text} means {nbytes} bytes; it must be at least 1,000,000 bytes; "
        + UNITS_HELP
    )
    assert "K or KB = 10^3 bytes" in UNITS_HELP and "KiB, MiB, GiB, TiB" in UNITS_HELP
    assert parse_size("1MB", minimum=MIN_SHARD_BYTES) == parse_size("1M") == MIN_SHARD_BYTES


# --------------------------------------------------------------------------- writing


def test_written_shards_match_save_file(tmp_path: Path) -> None:
    tensors = sample_tensors()
    reference = tmp_path / "reference.safetensors"
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(reference))
    expected = load_file(str(reference))
    out = tmp_path / "out"
    out.mkdir()
    write_all(out, tensors, max_bytes=64)

    index = json.loads((out / INDEX_NAME).read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == files
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.itemsize for t in tensors.values())
    loaded: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(out / name), framework="pt") as f:
            assert f.metadata() == {"format": "pt", "seed": "7"}
            for key in f.keys():
                assert index["weight_map"][key] == name
        loaded.update(load_file(str(out / name)))
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name


def test_single_shard_has_no_index_and_aligned_header(tmp_path: Path) -> None:
    tensors = sample_tensors()
    write_all(tmp_path, tensors, max_bytes=10**9)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    raw = (tmp_path / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0
    header = json.loads(raw[8 : 8 + length])
    assert header["c.bf16"]["dtype"] == "BF16"
    assert header["d.scalar"]["shape"] == []
    loaded = load_file(str(tmp_path / "model.safetensors"))
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name


def test_any_order_chunks_and_wrong_tensor_errors(tmp_path: Path) -> None:
    plan = plan_shards([spec("a", 2), spec("b", 5), spec("c", 3)], 16)
    tensors = {"a": torch.tensor([1.0, 2.0]), "b": torch.arange(5.0), "c": -torch.arange(3.0)}
    with ShardWriter(tmp_path, plan) as writer:
        with pytest.raises(ValueError, match="'zz' is not in the shard plan"):
            writer.write("zz", torch.zeros(3))
        with pytest.raises(ValueError, match=r"shape \(3,\), planned \(2,\)"):
            writer.write("a", torch.zeros(3))
        with pytest.raises(ValueError, match="dtype torch.float16, planned torch.float32"):
            writer.write("a", torch.zeros(2, dtype=torch.float16))
        with pytest.raises(ValueError, match=r"'b': elements 4..6 are outside its 5 elements"):
            writer.write_part("b", 4, torch.zeros(2))
        writer.write("c", tensors["c"])  # last shard first, then b in two chunks, backwards
        writer.write_part("b", 3, tensors["b"][3:])
        writer.write_part("b", 0, tensors["b"][:3])
        writer.write("a", tensors["a"])
    loaded = {}
    for shard in plan.shards:
        loaded.update(load_file(str(tmp_path / shard.filename)))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name
    with pytest.raises(ValueError, match="the writer is closed"):
        writer.write("a", tensors["a"])


def test_journaled_digests_are_the_bytes_on_disk_in_any_part_order(tmp_path: Path) -> None:
    """The journal's CRC-32 of each tensor is computed from the parts as written when they
    come in order, else re-read: either way it is the CRC-32 of the tensor's bytes in its
    shard (``zlib.crc32`` of them, as 8 hex digits), and the journal lines say so."""
    import zlib

    from merge.resume import Journal, read_journal

    plan = plan_shards([spec("a", 6), spec("b", 5), spec("c", 4)], 64)
    tensors = {"a": torch.arange(6.0), "b": -torch.arange(5.0), "c": torch.ones(4)}
    with Journal(tmp_path, "id") as journal:
        journal.start({})
        with ShardWriter(tmp_path, plan, journal=journal) as writer:
            writer.write_part("a", 0, tensors["a"][:2])  # in order
            writer.write_part("a", 2, tensors["a"][2:])
            writer.write_part("b", 3, tensors["b"][3:])  # out of order: re-read
            writer.write_part("b", 0, tensors["b"][:3])
            writer.write_part("c", 0, tensors["c"][:2])  # a gap, filled later
            writer.write_part("c", 3, tensors["c"][3:])
            writer.write_part("c", 2, tensors["c"][2:3])
            for name in tensors:
                writer.finish(name)
    expected = {n: f"{zlib.crc32(t.numpy().tobytes()):08x}" for n, t in tensors.items()}
    assert writer.done == expected
    assert read_journal(tmp_path) == ("id", expected)


def test_incomplete_close_errors(tmp_path: Path) -> None:
    plan = plan_shards([spec("a", 2), spec("b", 3), spec("c", 3)], 8)
    writer = ShardWriter(tmp_path, plan)
    writer.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="2 tensors not written: 'b', 'c'"):
        writer.close()
    assert not (tmp_path / INDEX_NAME).exists()
    assert writer._fds == []  # handles closed


def test_exception_inside_writer_closes_without_index(tmp_path: Path) -> None:
    plan = plan_shards([spec("a", 2), spec("b", 3)], 8)
    with pytest.raises(KeyError), ShardWriter(tmp_path, plan) as writer:
        writer.write("a", torch.zeros(2))
        raise KeyError("boom")
    assert writer._fds == []
    assert not (tmp_path / INDEX_NAME).exists()


def test_bad_metadata_rejected(tmp_path: Path) -> None:
    plan = plan_shards([spec("a", 2)], 100)
    with pytest.raises(ValueError, match="str to str"):
        ShardWriter(tmp_path, plan, {"seed": 7})  # type: ignore[dict-item]


def test_output_loads_in_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    state = {n: t.detach() for n, t in model.state_dict().items()}
    out = tmp_path / "model"
    with AtomicOutput(out, overwrite=False) as temp:
        config.save_pretrained(temp)
        write_all(temp, state, max_bytes=4096)
    assert len(json.loads((out / INDEX_NAME).read_text())["weight_map"]) == len(state)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name


# --------------------------------------------------------------------------- atomic output


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_atomic_success_renames(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with AtomicOutput(final, overwrite=False) as temp:
        assert temp.parent == tmp_path and temp.name.startswith(".out.tmp-")
        assert not final.exists()
        (temp / "x.txt").write_text("new")
    assert (final / "x.txt").read_text() == "new"
    assert leftovers(tmp_path) == []


def test_atomic_failure_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), AtomicOutput(final, overwrite=False) as temp:
        (temp / "x.txt").write_text("partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_refuses_existing_without_overwrite(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "keep.txt").write_text("old")
    with pytest.raises(OutputError, match=r"already exists; pass --overwrite to replace it"):
        with AtomicOutput(final, overwrite=False):
            pytest.fail("must not enter")
    assert (final / "keep.txt").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_atomic_overwrite_failure_keeps_old(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError), AtomicOutput(final, overwrite=True) as temp:
        (temp / "x.txt").write_text("partial")
        raise RuntimeError("boom")
    assert [p.name for p in final.iterdir()] == ["keep.txt"]
    assert leftovers(tmp_path) == []


def test_atomic_overwrite_replaces(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "keep.txt").write_text("old")
    with AtomicOutput(final, overwrite=True) as temp:
        (temp / "x.txt").write_text("new")
    assert [p.name for p in final.iterdir()] == ["x.txt"]
    assert leftovers(tmp_path) == []


def test_atomic_output_appearing_during_run_is_kept(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with pytest.raises(OutputError, match="already exists"):
        with AtomicOutput(final, overwrite=False) as temp:
            (temp / "x.txt").write_text("new")
            final.mkdir()
    assert list(final.iterdir()) == []
    assert leftovers(tmp_path) == []


def test_atomic_overwrite_refuses_a_file(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.write_text("not a dir")
    with pytest.raises(OutputError, match="not a directory"):
        with AtomicOutput(final, overwrite=True):
            pytest.fail("must not enter")
    assert final.read_text() == "not a dir"


# --------------------------------------------------------------------------- location checks


def test_output_inside_input(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    inside = model / "out"
    problems = check_output_location(inside, [model])
    assert problems == [
        f"output '{inside}' is inside input model '{model}' ({model.resolve()}); "
        "choose another directory"
    ]
    assert len(check_output_location(model, [model])) == 1  # the input itself


def test_input_inside_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    model = out / "model"
    assert check_output_location(out, [model]) == []  # output does not exist yet
    model.mkdir(parents=True)
    (problem,) = check_output_location(out, [model])
    assert problem.startswith(f"input model '{model}' ({model.resolve()}) is inside output")


def test_sibling_output_is_fine(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "ab"
    a.mkdir()
    b.mkdir()
    assert check_output_location(tmp_path / "out", [a, b]) == []
    assert check_output_location(b, [a]) == []  # 'ab' is not inside 'a'


def test_check_disk_space(tmp_path: Path) -> None:
    target = tmp_path / "not" / "yet" / "out"
    assert check_disk_space(target, 1) is None
    message = check_disk_space(target, 10**18)
    assert message is not None
    assert "1000000000.00 GB" in message and str(tmp_path) in message


def test_atomic_overwrite_rename_failure_restores_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "keep.txt").write_text("old")
    real_rename = os.rename

    def failing_rename(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        if Path(src).name.startswith(".out.tmp-"):
            raise OSError("disk on fire")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="disk on fire"), AtomicOutput(final, overwrite=True) as temp:
        (temp / "x.txt").write_text("new")
    assert [p.name for p in final.iterdir()] == ["keep.txt"]
    assert leftovers(tmp_path) == []
