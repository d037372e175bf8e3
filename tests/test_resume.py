"""Crash safety (merge.resume): runs killed with SIGKILL or stopped with SIGTERM at several
points, then resumed with ``--resume``, give bit-identical outputs; journaled tensors are
re-verified, leftovers are reported, and a resume of another plan is refused."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from merge.resume import JOURNAL_NAME, TEST_HOOK, partial_dir, read_journal
from tiny import make_tiny

ROOT = Path(__file__).resolve().parents[1]
SHARD = "2MB"  # the ~10 MB model below gives 6 shards


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dare_ties (random: seeded per tensor) recipe over two ~10 MB models."""
    root = tmp_path_factory.mktemp("resume")
    base = make_tiny(root / "base", hidden=256, layers=4)
    ft1 = make_tiny(root / "ft1", hidden=256, layers=4, noise_from=base)
    ft2 = make_tiny(root / "ft2", hidden=256, layers=4, noise_from=base, seed=1)
    text = {
        "merge_method": "dare_ties",
        "base_model": str(base),
        "models": [
            {"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in (ft1, ft2)
        ],
        "seed": 7,
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(text, sort_keys=False))
    return path


def merge(*args: str | Path, hook: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != TEST_HOOK}
    if hook is not None:
        env[TEST_HOOK] = hook
    argv = [sys.executable, "-m", "merge.cli", "run", *(str(a) for a in args)]
    return subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def clean(recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("clean") / "out"
    done = merge(recipe, out, "--out-shard-size", SHARD, "--threads", "2", "-q")
    assert done.returncode == 0, done.stderr
    return hashes(out)


@pytest.fixture(scope="module")
def total(clean: dict[str, str], recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> int:
    """The recipe's number of output tensors, from a second clean run (one thread) that must
    agree with the first."""
    out = tmp_path_factory.mktemp("count") / "out"
    done = merge(recipe, out, "--out-shard-size", SHARD, "-q")
    assert done.returncode == 0, done.stderr
    assert hashes(out) == clean  # two clean runs agree
    shards = [k for k in clean if k.endswith(".safetensors")]
    assert len(shards) >= 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    return len(index["weight_map"])


def interrupt(recipe: Path, out: Path, after: int, sig: str) -> subprocess.CompletedProcess[str]:
    """A run into ``out`` that signals itself after ``after`` journaled tensors."""
    return merge(recipe, out, "--out-shard-size", SHARD, "--threads", "2", hook=f"{after}:{sig}")


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("point", ["first", "middle", "last"])
def test_interrupted_run_resumes_to_the_same_bytes(
    recipe: Path, clean: dict[str, str], total: int, tmp_path: Path, sig: str, point: str
) -> None:
    after = {"first": 1, "middle": total // 2, "last": total - 1}[point]
    out = tmp_path / "out"
    stopped = interrupt(recipe, out, after, sig)
    part = partial_dir(out)
    if sig == "SIGKILL":
        assert stopped.returncode == -signal.SIGKILL
    else:  # stops as Ctrl-C does: exit 130, says what it kept and how to resume
        assert stopped.returncode == 130, stopped.stderr
        assert "--resume" in stopped.stderr and str(part) in stopped.stderr
        assert "Traceback" not in stopped.stderr
    assert not out.exists() and part.is_dir()
    _, done = read_journal(part)
    assert len(done) >= after
    # the resumed run computes only the rest: a hook one tensor past that never fires
    resumed = merge(
        recipe,
        out,
        "--out-shard-size",
        SHARD,
        "--resume",
        "-q",
        hook=f"{total - len(done) + 1}:SIGKILL",
    )
    assert resumed.returncode == 0, resumed.stderr
    assert hashes(out) == clean
    assert not part.exists()


def _flip_a_byte(part: Path, name: str) -> None:
    """Flip one byte of tensor ``name``'s data in its shard."""
    for shard in part.glob("*.safetensors"):
        raw = shard.read_bytes()
        (size,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + size])
        if name in header:
            at = 8 + size + header[name]["data_offsets"][0]
            with open(shard, "r+b") as f:
                f.seek(at)
                f.write(bytes([raw[at] ^ 0xFF]))
            return
    raise AssertionError(f"{name} not found")


def test_a_corrupted_journaled_tensor_is_recomputed_not_trusted(
    recipe: Path, clean: dict[str, str], total: int, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert interrupt(recipe, out, total // 2, "SIGKILL").returncode == -signal.SIGKILL
    part = partial_dir(out)
    _, done = read_journal(part)
    _flip_a_byte(part, next(iter(done)))
    resumed = merge(recipe, out, "--out-shard-size", SHARD, "--resume", "-q")
    assert resumed.returncode == 0, resumed.stderr
    assert hashes(out) == clean


def test_leftovers_are_reported_and_a_resume_of_another_plan_is_refused(
    recipe: Path, clean: dict[str, str], total: int, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert interrupt(recipe, out, 3, "SIGKILL").returncode == -signal.SIGKILL
    part = partial_dir(out)
    again = merge(recipe, out, "--out-shard-size", SHARD)
    assert again.returncode == 2
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, again.stderr
    assert "interrupted run" in errors[0] and "--resume" in errors[0]
    assert f"of {total} tensors done" in errors[0]
    other = merge(recipe, out, "--out-shard-size", SHARD, "--resume", "--seed", "8")
    assert other.returncode == 2
    errors = [line for line in other.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot resume" in errors[0], other.stderr
    assert part.is_dir() and (part / JOURNAL_NAME).is_file()  # neither error discarded them
    resumed = merge(recipe, out, "--out-shard-size", SHARD, "--resume", "-q")
    assert resumed.returncode == 0, resumed.stderr
    assert hashes(out) == clean


def test_resume_without_leftovers_is_a_plain_run_and_stale_siblings_are_reported(
    recipe: Path, clean: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-abcd1234"
    stale.mkdir()
    done = merge(recipe, out, "--out-shard-size", SHARD, "--resume")
    assert done.returncode == 0, done.stderr
    assert hashes(out) == clean
    warned = [line for line in done.stderr.splitlines() if str(stale) in line]
    assert len(warned) == 1 and warned[0].startswith("warning:")
    assert stale.is_dir()  # reported, not deleted behind the user's back
