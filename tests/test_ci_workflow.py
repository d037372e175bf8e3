"""recipes/ci/rebuild.yml, the GitHub Actions workflow users copy: well formed, every step
explained, the one secret it reads is HF_TOKEN, and the command it runs is ours."""

from __future__ import annotations

import re
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
