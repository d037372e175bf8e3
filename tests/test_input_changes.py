"""Inputs that change under a run (merge.inputstate): an input truncated or rewritten in place
while tensors are read, or changed after the last tensor and before the output is committed,
stops the run with one line naming the file (exit 2, no traceback, no output, never a SIGBUS);
a resume after an input changed is refused, naming the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from merge.checkpoint import Checkpoint
from merge.errors import CheckpointError
from merge.inputstate import resume_problems
from merge.resume import JOURNAL_NAME, TEST_HOOK, journal_header, partial_dir
from tiny import make_tiny

ROOT = Path(__file__).resolve().parents[1]
ACTION = "MERGE_TEST_INPUT_ACTION"  # read by DRIVER only, never by the library

# Runs the CLI with one change to an input: after N journaled tensors ("N:what:path"), or
# after the output's small files are written ("end:what:path"), the last step before commit.
DRIVER = """
import os, sys
from merge import api, resume
from merge.cli import main

when, what, path = os.environ["MERGE_TEST_INPUT_ACTION"].split(":", 2)

def change():
    st = os.stat(path)
    if what == "truncate":
        os.truncate(path, st.st_size // 2)
    elif what == "rewrite":  # NaN bytes in place, same size; a new mtime, as a write gives
        with open(path, "r+b") as f:
            f.seek(st.st_size // 2)
            f.write(b"\\xff" * 4096)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    else:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

if when == "end":
    extras = api.write_extras
    def write_extras(*a, **k):
        extras(*a, **k)
        change()
    api.write_extras = write_extras
else:
    record = resume.Journal.record
    def recorded(self, name, digest):
        record(self, name, digest)
        if self._count == int(when):
            change()
    resume.Journal.record = recorded

sys.argv = ["merge", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("inputs")
    base = make_tiny(root / "base", hidden=64, layers=2)
    ft = make_tiny(root / "ft", hidden=64, layers=2, noise_from=base)
    return base, ft


@pytest.fixture
def recipe(models: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A linear recipe over private copies of the two models (tests change them); and the
    weight file of the second one."""
    dirs = []
    for m in models:
        copy = tmp_path / m.name
        copy.mkdir()
        for f in m.iterdir():
            (copy / f.name).write_bytes(f.read_bytes())
        dirs.append(copy)
    text = {"merge_method": "linear", "models": [{"model": str(d)} for d in dirs]}
    text["parameters"] = {"weight": 0.5}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(text, sort_keys=False))
    return path, dirs[1] / "model.safetensors"


def merge(
    *args: str | Path, action: str | None = None, hook: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in (TEST_HOOK, ACTION)}
    if hook is not None:
        env[TEST_HOOK] = hook
    if action is None:
        argv = [sys.executable, "-m", "merge.cli", "run"]
    else:
        env[ACTION] = action
        argv = [sys.executable, "-c", DRIVER, "run"]
    argv += [str(a) for a in args]
    return subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def one_error(done: subprocess.CompletedProcess[str]) -> str:
    """The run failed as a user error: exit 2 (not killed by a signal), one line, no trace."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("what", "said"),
    [("truncate", "size "), ("rewrite", "it was modified")],
)
def test_an_input_changed_during_the_run_stops_it(
    recipe: tuple[Path, Path], tmp_path: Path, what: str, said: str
) -> None:
    path, weights = recipe
    out = tmp_path / "out"
    done = merge(path, out, "--threads", "1", "-q", action=f"2:{what}:{weights}")
    line = one_error(done)
    assert str(weights) in line and "changed during the run" in line and said in line
    assert "rerun once the input is stable" in line
    assert not out.exists() and not partial_dir(out).exists()


def test_a_bin_input_changed_during_the_run_stops_it(tmp_path: Path) -> None:
    """``.bin`` inputs stay memory-mapped, but each tensor handed out is checked first."""
    base = make_tiny(tmp_path / "base", hidden=64, layers=2, fmt="bin")
    ft = make_tiny(tmp_path / "ft", hidden=64, layers=2, noise_from=base, fmt="bin")
    text = {"merge_method": "linear", "models": [{"model": str(d)} for d in (base, ft)]}
    text["parameters"] = {"weight": 0.5}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(text, sort_keys=False))
    weights = ft / "pytorch_model.bin"
    out = tmp_path / "out"
    line = one_error(merge(path, out, "--threads", "1", "-q", action=f"2:touch:{weights}"))
    assert str(weights) in line and "it was modified" in line
    assert not out.exists() and not partial_dir(out).exists()


def test_an_input_changed_before_commit_stops_it(recipe: tuple[Path, Path], tmp_path: Path) -> None:
    path, weights = recipe
    out = tmp_path / "out"
    line = one_error(merge(path, out, "-q", action=f"end:touch:{weights}"))
    assert str(weights) in line and "it was modified" in line
    assert not out.exists() and not partial_dir(out).exists()


def test_resume_after_an_input_changed_is_refused(
    recipe: tuple[Path, Path], tmp_path: Path
) -> None:
    path, weights = recipe
    out = tmp_path / "out"
    killed = merge(path, out, "--threads", "1", "-q", hook="2:SIGKILL")
    assert killed.returncode == -9, killed.stderr
    part = partial_dir(out)
    header = journal_header(part)
    assert header is not None
    st = weights.stat()
    assert header["inputs"][str(weights.resolve())] == [st.st_size, st.st_mtime_ns]
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    line = one_error(merge(path, out, "--resume", "-q"))
    assert f"input '{weights.resolve()}' was modified since the interrupted run" in line
    assert f"delete '{part}' to start over" in line
    assert part.is_dir() and (part / JOURNAL_NAME).is_file() and not out.exists()
    # what the message says works
    import shutil

    shutil.rmtree(part)
    done = merge(path, out, "--resume", "-q")
    assert done.returncode == 0, done.stderr
    assert out.is_dir()


def test_a_short_read_is_an_error_not_a_crash(models: tuple[Path, Path], tmp_path: Path) -> None:
    """Without a stamp to catch it first, a truncated file is a short ``preadv``."""
    folder = tmp_path / "m"
    folder.mkdir()
    for f in models[0].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    ckpt = Checkpoint.open(folder, "m")
    last = max(ckpt.tensors.values(), key=lambda i: i.offset)
    whole = ckpt.read(last.name)
    assert torch.equal(ckpt.read_range(last.name, 0, whole.numel()), whole.reshape(-1))
    os.truncate(last.file, last.offset + 4)
    with pytest.raises(CheckpointError, match="size .* -> .* bytes"):
        ckpt.read(last.name)
    ckpt._stamps = {}
    with pytest.raises(CheckpointError, match="it ends .* bytes early"):
        ckpt.read_range(last.name, 0, whole.numel())
    ckpt.close()


def test_resume_problems_name_each_file(tmp_path: Path) -> None:
    part = tmp_path / ".out.partial"
    now = {"/m/a.safetensors": [10, 5], "/m/b.safetensors": [20, 6]}
    assert resume_problems(part, dict(now), now) == []
    old = {"/m/a.safetensors": [12, 5], "/m/c.safetensors": [1, 1]}
    lines = resume_problems(part, old, now)
    assert lines == [
        "cannot resume: input '/m/a.safetensors' changed since the interrupted run "
        f"(size 12 -> 10 bytes); delete '{part}' to start over",
        "cannot resume: input '/m/b.safetensors' was not an input of the interrupted run; "
        f"delete '{part}' to start over",
        "cannot resume: input '/m/c.safetensors' was an input of the interrupted run and is "
        f"not one now; delete '{part}' to start over",
    ]
    (older,) = resume_problems(part, None, now)
    assert "does not record its inputs" in older
    assert json.dumps(now)  # the journal's form is plain JSON
