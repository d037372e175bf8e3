"""merge.checkpoint: header-only opening, lazy reads, and every unreadable-input message."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from _ckpt_utils import snapshot_files, tiny_state_dict, write_bin, write_config, write_safetensors
from merge.checkpoint import Checkpoint
from merge.errors import CheckpointError
from merge.headers import read_safetensors_header


def assert_reads_equal(ckpt: Checkpoint, sd: dict[str, torch.Tensor]) -> None:
    assert set(ckpt.tensors) == set(sd)
    for name, t in sd.items():
        info = ckpt.tensors[name]
        assert (info.shape, info.dtype, info.nbytes) == (
            tuple(t.shape),
            t.dtype,
            t.numel() * t.element_size(),
        )
        got = ckpt.read(name)
        assert got.dtype == t.dtype and got.device.type == "cpu"
        assert torch.equal(got, t), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_safetensors(tmp_path: Path, dtype: torch.dtype) -> None:
    sd = tiny_state_dict(dtype=dtype)
    d = write_safetensors(tmp_path / "m", sd)
    with Checkpoint.open(d, "my-model") as ckpt:
        assert ckpt.format == "safetensors" and ckpt.label == "my-model"
        assert ckpt.config["hidden_size"] == 16 and ckpt.num_layers == 2
        assert {i.file for i in ckpt.tensors.values()} == {d / "model.safetensors"}
        assert_reads_equal(ckpt, sd)


def test_sharded_safetensors(tmp_path: Path) -> None:
    sd = tiny_state_dict(seed=1)
    d = write_safetensors(tmp_path / "m", sd, shards=3)
    ckpt = Checkpoint.open(d, "m")
    assert len({i.file for i in ckpt.tensors.values()}) == 3
    assert ckpt.tensors["lm_head.weight"].file == d / "model-00003-of-00003.safetensors"
    assert_reads_equal(ckpt, sd)
    ckpt.close()


@pytest.mark.parametrize("shards", [1, 2])
def test_bin_is_memory_mapped(tmp_path: Path, shards: int) -> None:
    sd = tiny_state_dict(seed=2)
    d = write_bin(tmp_path / "m", sd, shards=shards)
    ckpt = Checkpoint.open(d, "m")
    assert ckpt.format == "bin"
    assert_reads_equal(ckpt, sd)
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps to see memory mappings")
    ranges = [
        tuple(int(x, 16) for x in line.split()[0].split("-"))
        for line in maps.read_text().splitlines()
        if line.endswith(".bin") and str(d) in line
    ]
    t = ckpt.read("model.layers.1.mlp.down_proj.weight")
    assert any(lo <= t.data_ptr() < hi for lo, hi in ranges), "tensor data is not file-mapped"


def test_legacy_bin_falls_back_without_mmap(tmp_path: Path) -> None:
    sd = tiny_state_dict(seed=3)
    (tmp_path / "m").mkdir()
    torch.save(sd, tmp_path / "m" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert_reads_equal(Checkpoint.open(tmp_path / "m", "m"), sd)


def test_safetensors_preferred_over_bin_and_loose_file_accepted(tmp_path: Path) -> None:
    d = write_safetensors(tmp_path / "both", tiny_state_dict(seed=4))
    write_bin(d, tiny_state_dict(seed=5), config=False)
    assert Checkpoint.open(d, "both").format == "safetensors"
    loose = tmp_path / "loose"
    write_safetensors(loose, tiny_state_dict(), config=False)
    (loose / "model.safetensors").rename(loose / "weights.safetensors")
    ckpt = Checkpoint.open(loose, "loose")
    assert ckpt.config == {} and ckpt.num_layers is None
    assert ckpt.tensors["model.norm.weight"].file.name == "weights.safetensors"


def test_header_matches_safe_open(tmp_path: Path) -> None:
    sd = tiny_state_dict(seed=6) | {
        "i64": torch.arange(5),
        "i8": torch.ones(2, 3, dtype=torch.int8),
        "u8": torch.zeros(4, dtype=torch.uint8),
        "bool": torch.ones(3, dtype=torch.bool),
        "f16": torch.ones(1, 2, dtype=torch.float16),
        "f64": torch.ones(2, dtype=torch.float64),
        "fp8": torch.ones(4).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
    }
    d = write_safetensors(tmp_path / "m", sd)
    ours = read_safetensors_header(d / "model.safetensors", "m")
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        assert set(ours) == set(f.keys())
        for name in f.keys():
            sl = f.get_slice(name)
            assert ours[name].shape == tuple(sl.get_shape()), name
            assert ours[name].dtype == f.get_tensor(name).dtype, name
    info = ours["scalar"]
    assert (info.name, info.shape, info.dtype, info.file, info.nbytes) == (
        "scalar",
        (),
        torch.float32,
        d / "model.safetensors",
        4,
    )
    ckpt = Checkpoint.open(d, "m")  # zero-copy views read the bytes the offsets point at
    for name, tensor in sd.items():
        view = ckpt.view(name)
        assert view.dtype == tensor.dtype and view.shape == tensor.shape, name
        assert torch.equal(view.to(torch.float64), tensor.to(torch.float64)), name


def test_num_layers_keys(tmp_path: Path) -> None:
    d = write_safetensors(tmp_path / "m", tiny_state_dict(), config=False)
    cases: list[tuple[dict, int | None]] = [
        ({"n_layer": 3}, 3),
        ({"num_layers": 4}, 4),
        ({"n_layers": 5}, 5),
        ({"text_config": {"num_hidden_layers": 6}}, 6),
        ({"hidden_size": 8}, None),
    ]
    for config, want in cases:
        write_config(d, config)
        assert Checkpoint.open(d, "m").num_layers == want


# --- errors ----------------------------------------------------------------------------------


def open_error(directory: Path, label: str = "m") -> str:
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(directory, label)
    return str(info.value)


def test_truncated_file(tmp_path: Path) -> None:
    d = write_safetensors(tmp_path / "m", {"a": torch.zeros(4), "b": torch.zeros(8)})
    f = d / "model.safetensors"
    (header_len,) = struct.unpack("<Q", f.read_bytes()[:8])
    full = f.stat().st_size
    assert full == 8 + header_len + 48
    f.write_bytes(f.read_bytes()[:-10])
    assert open_error(d, "org/base") == (
        f"model 'org/base' ({f}): truncated: tensor 'b' needs bytes up to {full} "
        f"but the file has {full - 10} bytes"
    )


def with_header(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"\x01\x02", "truncated: the file has 2 bytes"),
        (struct.pack("<Q", 10**9) + b"{}", "corrupt header: declares 1000000000 header bytes"),
        (with_header(b"{nope"), "corrupt header: not valid JSON"),
        (with_header(b'{"x":{"dtype":"F32","shape":[2],"data_offsets"'), "corrupt header: not"),
        (with_header(b"[]"), "corrupt header: expected a JSON object"),
        (with_header(b'{"x":{"dtype":"F32"}}'), "corrupt header: bad entry for tensor 'x'"),
        (
            with_header(b'{"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', bytes(8)),
            "corrupt header: tensor 'x' has shape [3] (12 bytes) but offsets [0, 8]",
        ),
        (
            with_header(b'{"x":{"dtype":"Q4_0","shape":[2],"data_offsets":[0,8]}}', bytes(8)),
            "tensor 'x' has unsupported dtype 'Q4_0'",
        ),
    ],
)
def test_corrupt_header(tmp_path: Path, content: bytes, problem: str) -> None:
    (tmp_path / "m").mkdir()
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(content)
    assert open_error(tmp_path / "m").startswith(f"model 'm' ({f}): {problem}")


def test_missing_shard(tmp_path: Path) -> None:
    d = write_safetensors(tmp_path / "m", tiny_state_dict(), shards=2)
    (d / "model-00002-of-00002.safetensors").unlink()
    assert open_error(d) == (
        f"model 'm' ({d / 'model.safetensors.index.json'}): missing shard "
        "'model-00002-of-00002.safetensors' listed in the index"
    )


def test_index_inconsistent_with_shards(tmp_path: Path) -> None:
    d = write_safetensors(tmp_path / "m", tiny_state_dict(), shards=2)
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    index["weight_map"]["ghost"] = "model-00002-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    assert open_error(d).splitlines() == [
        f"model 'm' ({index_path}): the index puts tensor '{name}' in '{file}' "
        "but that shard lacks it"
        for name, file in [
            ("lm_head.weight", "model-00001-of-00002.safetensors"),
            ("ghost", "model-00002-of-00002.safetensors"),
        ]
    ]


def test_missing_directory_and_no_weights(tmp_path: Path) -> None:
    assert open_error(tmp_path / "nope", "x") == (
        f"model 'x' ({tmp_path / 'nope'}): directory not found"
    )
    write_config(tmp_path / "empty")
    assert open_error(tmp_path / "empty", "x") == (
        f"model 'x' ({tmp_path / 'empty'}): no model weights found: expected model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json"
    )


def test_bad_config_json(tmp_path: Path) -> None:
    d = write_safetensors(tmp_path / "m", tiny_state_dict(), config=False)
    (d / "config.json").write_text('{\n  "hidden_size": 16,\n  "vocab_size": oops\n}\n')
    assert open_error(d) == (
        f"model 'm' ({d / 'config.json'}): invalid JSON at line 3: Expecting value"
    )


def test_unreadable_bin(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    f = tmp_path / "m" / "pytorch_model.bin"
    f.write_bytes(b"not a pickle at all")
    assert open_error(tmp_path / "m").startswith(f"model 'm' ({f}): cannot read: ")


def test_inputs_not_modified(tmp_path: Path) -> None:
    st = write_safetensors(tmp_path / "st", tiny_state_dict(), shards=2)
    pt = write_bin(tmp_path / "pt", tiny_state_dict(), shards=2)
    before = snapshot_files(tmp_path)
    for d in (st, pt):
        with Checkpoint.open(d, "m") as ckpt:
            for name in ckpt.tensors:
                ckpt.read(name).mul_(0)  # even a careless in-place op must not reach the file
    assert snapshot_files(tmp_path) == before


def test_read_unknown_tensor(tmp_path: Path) -> None:
    ckpt = Checkpoint.open(write_safetensors(tmp_path / "m", tiny_state_dict()), "m")
    with pytest.raises(KeyError, match="model 'm' has no tensor 'nope'"):
        ckpt.read("nope")
