"""recipes/ci/rebuild.yml, the GitHub Actions workflow users copy: well formed, every step
explained, the one secret it reads is HF_TOKEN, the command it runs is ours, and its last step
(push the new lock, open a pull request) runs for real against a local git remote."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml

WORKFLOW = Path(__file__).resolve().parents[1] / "recipes" / "ci" / "rebuild.yml"
TEXT = WORKFLOW.read_text(encoding="utf-8")


def test_it_runs_on_a_schedule_and_by_hand() -> None:
    data = yaml.safe_load(TEXT)
    triggers = data.get("on", data.get(True))  # YAML 1.1 reads a bare `on` as true
    assert set(triggers) == {"schedule", "workflow_dispatch"}
    assert re.fullmatch(r"[\d*/,-]+( [\d*/,-]+){4}", triggers["schedule"][0]["cron"])
    assert data["permissions"] == {"contents": "write", "pull-requests": "write"}


def test_every_step_is_commented_and_named() -> None:
    lines = TEXT.splitlines()
    steps = [i for i, line in enumerate(lines) if re.match(r"\s+- name: ", line)]
    assert len(steps) >= 6
    for i in steps:
        assert lines[i - 1].strip().startswith("#"), lines[i]
    data = yaml.safe_load(TEXT)
    (job,) = data["jobs"].values()
    assert len(job["steps"]) == len(steps)
    assert all("name" in step for step in job["steps"])


def test_the_only_secret_is_hf_token() -> None:
    assert re.findall(r"secrets\.(\w+)", TEXT) == ["HF_TOKEN"]
    data = yaml.safe_load(TEXT)
    (job,) = data["jobs"].values()
    runs = [s for s in job["steps"] if s.get("run", "").startswith("merge rebuild")]
    assert len(runs) == 1 and runs[0]["env"] == {"HF_TOKEN": "${{ secrets.HF_TOKEN }}"}


def test_it_installs_cpu_torch_before_the_tool_and_commits_only_the_lock() -> None:
    data = yaml.safe_load(TEXT)
    (job,) = data["jobs"].values()
    install = next(s["run"] for s in job["steps"] if "pip install mergesmith" in s.get("run", ""))
    assert install.index("download.pytorch.org/whl/cpu") < install.index("install mergesmith")
    propose = job["steps"][-1]["run"]
    assert 'git add -- "$lock"' in propose and "gh pr create" in propose
    assert data["env"]["RECIPE"].endswith(".yaml")


def _propose(tmp_path: Path, lock_text: str | None) -> tuple[str, list[str]]:
    """Run the workflow's last step in a clone of a fresh repo, with a stand-in ``gh`` that
    records its arguments; returns (stdout, the gh calls)."""
    data = yaml.safe_load(TEXT)
    (job,) = data["jobs"].values()
    script = job["steps"][-1]["run"]
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    remote, work, bin_dir = tmp_path / "remote.git", tmp_path / "work", tmp_path / "bin"
    subprocess.run([*git, "init", "-q", "--bare", str(remote)], check=True)
    subprocess.run([*git, "init", "-q", str(work)], check=True)
    (work / "my-merge.yaml").write_text("merge_method: linear\n")
    if lock_text is not None and lock_text.startswith("tracked:"):
        (work / "my-merge.lock").write_text(lock_text)
    subprocess.run([*git, "-C", str(work), "add", "."], check=True)
    subprocess.run([*git, "-C", str(work), "commit", "-qm", "init"], check=True)
    subprocess.run([*git, "-C", str(work), "remote", "add", "origin", str(remote)], check=True)
    if lock_text is not None:
        (work / "my-merge.lock").write_text(lock_text + "changed\n")
    bin_dir.mkdir()
    calls = tmp_path / "gh-calls"
    (bin_dir / "gh").write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\n[ "$1" != pr ] || [ "$2" != view ] || exit 1\n'
    )
    (bin_dir / "gh").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECIPE": "my-merge.yaml"}
    env.update(GIT_CONFIG_GLOBAL=str(tmp_path / "gitconfig"), GH_TOKEN="x")
    done = subprocess.run(
        ["bash", "-e", "-c", script], cwd=work, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    gh = calls.read_text().splitlines() if calls.exists() else []
    return done.stdout, gh


def test_an_unchanged_lock_proposes_nothing(tmp_path: Path) -> None:
    stdout, gh = _propose(tmp_path, None)
    assert stdout == "lock unchanged\n" and gh == []


def test_a_new_or_changed_lock_is_pushed_and_proposed(tmp_path: Path) -> None:
    for case, text in (("new", "version: 1\n"), ("changed", "tracked: 1\n")):
        root = tmp_path / case
        root.mkdir()
        _, gh = _propose(root, text)
        assert gh[0] == "pr view merge-rebuild/lock-update"
        assert gh[1].startswith("pr create --head merge-rebuild/lock-update --title Update")
        shown = subprocess.run(
            [
                "git",
                "--git-dir",
                str(root / "remote.git"),
                "show",
                "merge-rebuild/lock-update:my-merge.lock",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert shown == text + "changed\n"


def test_the_rebuild_line_publishes_only_when_push_to_hub_is_set() -> None:
    data = yaml.safe_load(TEXT)
    (job,) = data["jobs"].values()
    (line,) = [s["run"] for s in job["steps"] if s.get("run", "").startswith("merge rebuild")]
    assert data["env"]["PUSH_TO_HUB"] == ""
    shown = line.replace("merge rebuild", "printf '%s\\n' rebuild", 1)
    for push, want in (("", []), ("org/merged", ["--push-to-hub", "org/merged"])):
        env = {**os.environ, "RECIPE": "my merge.yaml", "OUT": "out/m", "PUSH_TO_HUB": push}
        done = subprocess.run(["bash", "-c", shown], env=env, capture_output=True, text=True)
        assert done.stdout.splitlines() == ["rebuild", "my merge.yaml", "out/m", *want]
