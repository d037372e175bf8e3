"""merge-manifest.json and ``merge verify``; the hash cache and input identities behind them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from merge import api
from merge.build import hashing
from merge.build.inputs import hub_snapshot, identify
from merge.build.manifest import MANIFEST_NAME
from merge.cli import app
from merge.sources import ModelRef

runner = CliRunner()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(*args: object) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def built(tmp_path: Path, llama_base: Path, llama_ft1: Path) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [
                    {"model": str(llama_base), "parameters": {"weight": 0.3}},
                    {"model": str(llama_ft1), "parameters": {"weight": 0.7}},
                ],
                "dtype": "bfloat16",
            }
        )
    )
    return api.run(recipe, tmp_path / "out", progress=False, shard_size=100_000)


def test_manifest_lists_every_output_file_and_the_inputs(
    built: Path, llama_base: Path, llama_ft1: Path
) -> None:
    manifest = json.loads((built / MANIFEST_NAME).read_text())
    assert list(manifest) == [
        "version",
        "tool",
        "tool_version",
        "recipe_sha256",
        "lock_sha256",
        "seed",
        "build_key",
        "inputs",
        "files",
    ]
    assert manifest["version"] == 1 and manifest["tool"] == "mergesmith"
    assert manifest["recipe_sha256"] == sha(built / "merge-recipe.yaml")
    assert manifest["lock_sha256"] is None and manifest["build_key"] is None
    on_disk = sorted(p.name for p in built.iterdir() if p.name != MANIFEST_NAME)
    assert len([n for n in on_disk if n.endswith(".safetensors")]) > 1  # sharded
    assert manifest["files"] == [
        {"path": n, "size": (built / n).stat().st_size, "sha256": sha(built / n)} for n in on_disk
    ]
    inputs = {i["ref"]: i for i in manifest["inputs"]}
    assert set(inputs) == {str(llama_base), str(llama_ft1)}
    for ref, folder in ((str(llama_base), llama_base), (str(llama_ft1), llama_ft1)):
        assert inputs[ref]["source"] == "local" and "directory" not in inputs[ref]
        names = [f["path"] for f in inputs[ref]["files"]]
        assert "model.safetensors" in names and "config.json" in names
        assert all(f["sha256"] == sha(folder / f["path"]) for f in inputs[ref]["files"])


def test_two_runs_write_identical_files(built: Path, tmp_path: Path) -> None:
    again = api.run(tmp_path / "r.yaml", tmp_path / "again", progress=False, shard_size=100_000)
    names = sorted(p.name for p in built.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert all((built / n).read_bytes() == (again / n).read_bytes() for n in names)


def test_verify_passes_on_a_fresh_output(built: Path) -> None:
    code, out, err = cli("verify", built)
    count = len(json.loads((built / MANIFEST_NAME).read_text())["files"])
    assert (code, out, err) == (0, "", f"{built}: ok, {count} files match the manifest\n")


def test_verify_names_each_file_that_differs(built: Path) -> None:
    shard = sorted(built.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor
    shard.write_bytes(bytes(data))
    (built / "generation_config.json").unlink()
    (built / "stray.txt").write_text("x")
    (built / "config.json").write_text((built / "config.json").read_text() + " ")
    code, out, err = cli("verify", built)
    config_size = (built / "config.json").stat().st_size
    assert code == 1
    assert out.splitlines() == [
        f"{built}/config.json: size {config_size} bytes, the manifest says {config_size - 1}",
        f"{built}/generation_config.json: missing",
        f"{built}/{shard.name}: content differs from the manifest (sha256)",
        f"{built}/stray.txt: not in the manifest",
    ]
    assert err == f"{built}: 4 problems against the manifest\n"


def test_verify_errors(tmp_path: Path, built: Path) -> None:
    assert cli("verify", tmp_path / "nope") == (
        2,
        "",
        f"error: {tmp_path / 'nope'}: not a directory; expected a merge output\n",
    )
    bare = tmp_path / "bare"
    bare.mkdir()
    code, _, err = cli("verify", bare)
    assert code == 2
    assert err == (
        f"error: {bare}: no {MANIFEST_NAME}; it was not written by this tool (or by a version "
        "before manifests); rebuild it with merge run\n"
    )
    path = built / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "extra": 1}))
    code, _, err = cli("verify", built)
    assert code == 2 and err.startswith(f"error: {path}: unknown field 'extra'; allowed: version,")
    path.write_text(json.dumps({**manifest, "version": 9}))
    code, _, err = cli("verify", built)
    assert code == 2 and err.startswith(f"error: {path}: version: 9 is not a manifest version")
    path.write_text("{\n  oops")
    code, _, err = cli("verify", built)
    assert code == 2 and err.startswith(f"error: {path}:2: not valid JSON:")
    path.write_text(json.dumps({**manifest, "files": [{"path": "../x", "size": 1, "sha256": ""}]}))
    code, _, err = cli("verify", built)
    assert (code, err) == (
        2,
        f"error: {path}: files: expected a list of {{path, size, sha256}} entries\n",
    )


def test_hash_cache_reads_each_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path / "cache"))
    reads: list[Path] = []
    real = hashing.digest
    monkeypatch.setattr(hashing, "digest", lambda p: reads.append(p) or real(p))
    file = tmp_path / "w.bin"
    file.write_bytes(b"a" * 1000)
    want = hashlib.sha256(b"a" * 1000).hexdigest()
    assert hashing.sha256_file(file) == want
    hashing._memory.clear()  # a new process: the cache comes from disk
    assert hashing.sha256_file(file) == want
    assert reads == [file]
    file.write_bytes(b"b" * 1000)  # same size, new mtime
    os.utime(file, ns=(1, 1))
    assert hashing.sha256_file(file) == hashlib.sha256(b"b" * 1000).hexdigest()
    assert reads == [file, file]
    (tmp_path / "cache" / hashing.CACHE_NAME).write_text("{corrupt")
    hashing._memory.clear()
    assert hashing.sha256_file(file) == hashlib.sha256(b"b" * 1000).hexdigest()  # rehashed
    assert len(reads) == 3


def test_a_hub_snapshot_is_identified_by_commit_and_blob_names(tmp_path: Path) -> None:
    repo = tmp_path / "models--org--name"
    commit = "c" * 40
    snap, blobs = repo / "snapshots" / commit, repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    weights = b"\x08" + b"\0" * 7 + b"{}      "
    lfs = hashlib.sha256(weights).hexdigest()
    (blobs / lfs).write_bytes(weights)
    (blobs / ("a" * 40)).write_text("{}")  # a git blob sha1 name: hashed
    (snap / "model.safetensors").symlink_to(f"../../blobs/{lfs}")
    (snap / "config.json").symlink_to(f"../../blobs/{'a' * 40}")
    assert hub_snapshot(snap) == ("org/name", commit)
    ident = identify(ModelRef.parse("org/name@v1"), snap)
    assert ident.as_dict() == {
        "ref": "org/name@v1",
        "source": "hub",
        "repo": "org/name",
        "revision": "v1",
        "commit": commit,
        "files": [
            {"path": "config.json", "size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()},
            {"path": "model.safetensors", "size": len(weights), "sha256": lfs},
        ],
    }
