"""Hub models planned from their headers: validate and plan download no weights; run does,
after the plan passed.

Three repos on a local ``HubServer`` (the real huggingface_hub client against it): a llama of
hidden size 128 in three shards of about 0.6 MB with an index, a fine-tune of it in one
``model.safetensors``, and a narrower llama (hidden 64) for a shape mismatch. huggingface_hub
reads a shard's header with one Range request of its first 100 kB, so the shards are several
times that, and the server's log tells header reads (206) from downloads (200).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from hubserver import HubServer, Served, commit_sha, use_endpoint
from merge import api, sourceset
from merge.cli import app
from merge.errors import CheckpointError, OutputError, SourceError
from merge.hub import RemoteCheckpoint, RemoteModel, download_weights, locate_model
from merge.report import human_bytes, plan_json
from tiny import make_tiny

HEADER_PROBE = 100_001  # parse_safetensors_file_metadata's first read: bytes=0-100000
runner = CliRunner()


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("remote")
    sharded = make_tiny(root / "sharded", hidden=128, seed=5, shard_bytes=700_000)
    return {
        "org/sharded": sharded,
        "org/single": make_tiny(root / "single", seed=6, noise_from=sharded),
        "org/narrow": make_tiny(root / "narrow", hidden=64, seed=7),
    }


@pytest.fixture
def hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repos: dict[str, Path]
) -> Iterator[HubServer]:
    """The repos on a running server (copies: a test may change one); online, fresh cache."""
    served = {r: Path(shutil.copytree(f, tmp_path / "served" / r)) for r, f in repos.items()}
    repos_served = {repo: {"main": folder} for repo, folder in served.items()}
    repos_served["org/gated"] = {"main": served["org/single"]}
    with HubServer(repos_served, gated=("org/gated",)) as server:
        use_endpoint(monkeypatch, server.endpoint, tmp_path / "hub-cache")
        monkeypatch.chdir(tmp_path)  # no local folder named org/... shadows the Hub ids
        yield server


def recipe(folder: Path, models: list[str], name: str = "recipe.yaml") -> Path:
    """A linear recipe of ``models`` (model i on line 3 + 2 * i)."""
    body = {
        "merge_method": "linear",
        "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models],
        "dtype": "float32",
    }
    path = folder / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def served_weights(repos: dict[str, Path], *names: str) -> list[Path]:
    return [f for name in names for f in sorted(repos[name].glob("*.safetensors"))]


def weight_reads(server: HubServer) -> list[Served]:
    return [s for s in server.log if s.file and s.file.endswith(".safetensors") and s.sent]


def assert_headers_only(server: HubServer, repos: dict[str, Path]) -> None:
    """Every byte of a safetensors file served was a header read: one Range request of the
    first 100 kB per shard, each file much longer than what was sent of it."""
    reads = weight_reads(server)
    assert reads and not any(f.endswith(".safetensors") for f in server.fetched_whole())
    assert all(s.status == 206 and s.range == "bytes=0-100000" for s in reads), reads
    files = [(s.repo, s.file) for s in reads]
    assert len(files) == len(set(files))  # one read per shard
    for s in reads:
        assert s.sent == HEADER_PROBE < (repos[str(s.repo)] / str(s.file)).stat().st_size / 5


def test_plan_and_validate_read_only_headers(
    hub: HubServer, tmp_path: Path, repos: dict[str, Path]
) -> None:
    path = recipe(tmp_path, ["org/sharded", "org/single"])
    result = runner.invoke(app, ["plan", str(path)])
    assert result.exit_code == 0, result.stderr
    assert_headers_only(hub, repos)
    shards = {f.name for f in repos["org/sharded"].glob("*.safetensors")}
    assert {s.file for s in weight_reads(hub)} == shards | {"model.safetensors"}
    weights = sum(f.stat().st_size for f in served_weights(repos, "org/sharded", "org/single"))
    assert hub.bytes_served(".safetensors") == 4 * HEADER_PROBE < weights / 8
    assert (
        f"download: {human_bytes(weights)} of weights, when run (planned from their headers on "
        "the Hub: org/sharded, org/single)\n"
    ) in result.stdout
    snapshot = tmp_path / "hub-cache" / "models--org--sharded" / "snapshots"
    folder = snapshot / commit_sha("org/sharded", "main")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        p.name for p in repos["org/sharded"].iterdir() if not p.name.endswith(".safetensors")
    )
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0 and result.stdout.startswith(f"{path}: ok"), result.stderr
    assert len(weight_reads(hub)) == 8 and not hub.fetched_whole() & shards  # headers again


def test_plan_json_counts_the_download(hub: HubServer, tmp_path: Path) -> None:
    p = api.plan(recipe(tmp_path, ["org/single", "org/single@main"]))
    remote = [m.remote for m in p.models.values()]
    assert all(isinstance(m.checkpoint, RemoteCheckpoint) for m in p.models.values())
    assert remote[0] is not None and remote[0].download_bytes > 1_000_000
    assert plan_json(p)["download_bytes"] == remote[0].download_bytes  # one commit, once
    with pytest.raises(RuntimeError, match="planned from the Hub's headers"):
        p.models["org/single"].checkpoint.read("model.norm.weight")


def test_problems_are_found_from_headers(
    hub: HubServer, tmp_path: Path, repos: dict[str, Path]
) -> None:
    """A shape mismatch and a bad layer range: reported from headers, no weight sent."""
    mismatch = recipe(tmp_path, ["org/sharded", "org/narrow"])
    result = runner.invoke(app, ["validate", str(mismatch)])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines()[0] == (
        "error: tensor 'model.embed_tokens.weight' and 1 other tensor: shape [512, 64] in model "
        "'org/narrow' does not match [512, 128] in model 'org/sharded'"
    )
    slices = tmp_path / "slices.yaml"
    slices.write_text(
        yaml.safe_dump(
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": "org/single", "layer_range": [0, 5]}]}],
            }
        )
    )
    result = runner.invoke(app, ["plan", str(slices)])
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {slices}:4: slices[0].sources[0].layer_range: [0, 5] is out of range: model "
        "'org/single' has 2 layers (layer_range is [start, end) with end <= 2)\n"
    )
    assert_headers_only(hub, repos)


def test_run_downloads_after_the_plan_and_matches_local(
    hub: HubServer, tmp_path: Path, repos: dict[str, Path]
) -> None:
    remote = recipe(tmp_path, ["org/sharded", "org/single"])
    result = runner.invoke(app, ["run", str(remote), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.stderr
    whole = [
        i
        for i, s in enumerate(hub.log)
        if s.method == "GET" and s.status == 200 and str(s.file).endswith(".safetensors")
    ]
    assert sorted((hub.log[i].repo, hub.log[i].file) for i in whole) == [
        (r, p.name) for r in ("org/sharded", "org/single") for p in served_weights(repos, r)
    ]
    assert all(i < whole[0] for i, s in enumerate(hub.log) if s.status == 206)
    local = recipe(tmp_path, [str(repos["org/sharded"]), str(repos["org/single"])], "local.yaml")
    result = runner.invoke(app, ["run", str(local), str(tmp_path / "local-out"), "--quiet"])
    assert result.exit_code == 0, result.stderr
    outputs = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert outputs == sorted(p.name for p in (tmp_path / "local-out").glob("*.safetensors"))
    for name in [*outputs, "model.safetensors.index.json"]:
        ours, theirs = tmp_path / "out" / name, tmp_path / "local-out" / name
        if ours.exists() or theirs.exists():
            assert ours.read_bytes() == theirs.read_bytes(), name
    seen = len(hub.log)  # the weights are in the cache now: planned from the files
    assert runner.invoke(app, ["plan", str(remote)]).exit_code == 0
    assert not [s for s in hub.log[seen:] if str(s.file).endswith(".safetensors")]


def test_a_run_whose_plan_fails_downloads_nothing(hub: HubServer, tmp_path: Path) -> None:
    path = recipe(tmp_path, ["org/sharded", "org/single"])
    (tmp_path / "out").mkdir()
    result = runner.invoke(app, ["run", str(path), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr.endswith("already exists; pass --overwrite to replace it\n")
    bad = recipe(tmp_path, ["org/sharded", "org/narrow"], "bad.yaml")
    assert runner.invoke(app, ["run", str(bad), str(tmp_path / "new")]).exit_code == 2
    assert weight_reads(hub) and all(s.status == 206 for s in weight_reads(hub))
    assert not (tmp_path / "new").exists()


def test_no_room_for_the_download_is_a_plan_problem(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repos: dict[str, Path]
) -> None:
    weights = human_bytes(sum(f.stat().st_size for f in served_weights(repos, "org/sharded")))

    class Usage:
        free = 1_000_000

    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(OutputError) as info:
        api.run(recipe(tmp_path, ["org/sharded"]), tmp_path / "out", progress=False)
    cache = tmp_path / "hub-cache"
    assert info.value.problems[-1].startswith(
        f"not enough disk space to download {weights} of weights into the Hugging Face cache "
        f"{cache} and write the "
    )
    assert info.value.problems[-1].endswith(
        f" output: 1.00 MB free on {cache}; free some space or set HF_HUB_CACHE"
    )
    assert all(s.status == 206 for s in weight_reads(hub))


def test_a_changed_download_is_an_error(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repos: dict[str, Path]
) -> None:
    """The file downloaded is not the one whose header was planned: refused, not merged."""
    served = tmp_path / "served" / "org/single" / "model.safetensors"
    real = sourceset.download_weights

    def swap_then_download(*args: object, **kwargs: object) -> None:
        shutil.copy(repos["org/narrow"] / "model.safetensors", served)
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sourceset, "download_weights", swap_then_download)
    with pytest.raises(CheckpointError) as info:
        api.run(recipe(tmp_path, ["org/single"]), tmp_path / "out", progress=False)
    assert str(info.value).startswith("model 'org/single': the downloaded weights in ")
    assert "differ from the headers the plan read from the Hub" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_offline_after_a_plan_names_the_missing_weights(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = recipe(tmp_path, ["org/single"])
    assert runner.invoke(app, ["plan", str(path)]).exit_code == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["plan", str(path)])
    folder = tmp_path / "hub-cache" / "models--org--single" / "snapshots"
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {path}:3: models[0].model: model 'org/single': the cached snapshot "
        f"{folder / commit_sha('org/single', 'main')} has no weights and HF_HUB_OFFLINE=1 is "
        "set; download it once online or use a local path\n"
    )


def test_server_ranges(hub: HubServer, repos: dict[str, Path]) -> None:
    from huggingface_hub import get_session

    url = f"{hub.endpoint}/org/single/resolve/main/model.safetensors"
    data = (repos["org/single"] / "model.safetensors").read_bytes()
    part = get_session().get(url, headers={"Range": "bytes=8-15"})
    assert part.status_code == 206 and part.content == data[8:16]
    assert part.headers["Content-Range"] == f"bytes 8-15/{len(data)}"
    tail = get_session().get(url, headers={"Range": f"bytes={len(data) - 3}-"})
    assert tail.status_code == 206 and tail.content == data[-3:]
    assert get_session().get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416
    assert get_session().get(url).content == data
    assert [s.sent for s in hub.log] == [8, 3, 0, len(data)]
    assert hub.fetched_whole() == {"model.safetensors"}
    assert hub.bytes_served(".safetensors", "org/single") == 11 + len(data)


@pytest.mark.parametrize(
    "repo_id, revision, message",
    [
        ("org/missing", None, "repo not found on the Hub (if it is private, log in with"),
        ("org/single", "nope", "revision 'nope' not found in the repo"),
        ("org/gated", None, "gated repo: accept its terms on the Hub, then log in with"),
    ],
)
def test_errors_are_the_downloads_ones(
    hub: HubServer, repo_id: str, revision: str | None, message: str
) -> None:
    label = repo_id if revision is None else f"{repo_id}@{revision}"
    with pytest.raises(SourceError) as info:
        locate_model(repo_id, revision)
    assert str(info.value).startswith(f"model '{label}': {message}")
    assert not hub.fetched()


def test_download_progress_bars_are_huggingface_hubs_or_none(
    hub: HubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    quiet, shown = locate_model("org/single", None), locate_model("org/sharded", None)
    assert isinstance(quiet, RemoteModel) and isinstance(shown, RemoteModel)
    was_off = are_progress_bars_disabled()  # tests/tiny.py turns them off through transformers
    enable_progress_bars()
    try:
        capsys.readouterr()
        download_weights([quiet], progress=False)
        assert capsys.readouterr().err == ""
        download_weights([shown, shown], progress=True)  # one repo and commit: once
        assert "100%" in capsys.readouterr().err
    finally:
        if was_off:
            disable_progress_bars()
    assert (quiet.folder / "model.safetensors").is_file()
    whole = [s for s in hub.log if s.method == "GET" and s.status == 200 and s.sent > 500_000]
    assert len(whole) == 4
