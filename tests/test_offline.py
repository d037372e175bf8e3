"""No network and no HF_HUB_OFFLINE: one probe per run, then the Hugging Face cache only.

Each test undoes the session's offline setup (``hubserver.use_endpoint``) and points the client
at a Hub that cannot be reached: ``https://hub.invalid``, whose every DNS lookup is counted and
fails (``socket.getaddrinfo`` is wrapped, so the machine's DNS never matters), or a local
listener that accepts connections and never answers. Models are seeded into the cache by
downloading them from a local ``HubServer`` first. No test checks wall times.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
from typer.testing import CliRunner

from hubserver import HubServer, use_endpoint
from merge.cli import app
from merge.errors import SourceError
from merge.hub import download as hub
from merge.hub import download_model, hub_run

UNREACHABLE = "https://hub.invalid"
DNS_ERROR = f"ConnectError: [Errno {socket.EAI_NONAME}] Name or service not known"
STEP = "download it once online, use a local path, or set HF_HUB_OFFLINE=1 to use only the cache"
NO_ANSWER = "no answer within 0.3 s; MERGE_HUB_PROBE_TIMEOUT sets how long to wait"
PROXIES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")


def _reset_session() -> None:
    """Drop huggingface_hub's shared client: the next one reads the test's proxy settings."""
    close = getattr(huggingface_hub, "close_session", None)
    close() if close else huggingface_hub.utils.reset_sessions()  # 0.2x


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty HF cache; no proxies; a fresh client before and after the test."""
    for var in PROXIES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)  # no local folder named org/... shadows the Hub ids
    _reset_session()
    yield tmp_path / "hub-cache"
    _reset_session()


@pytest.fixture
def lookups(cache: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Online mode against hub.invalid; each DNS lookup of it is recorded here and fails."""
    use_endpoint(monkeypatch, UNREACHABLE, cache)
    seen: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
        if host == "hub.invalid":
            seen.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return seen


@pytest.fixture
def silent_hub(cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, list]]:
    """(endpoint, accepted connections) of a listener that never answers; 0.3 s probe timeout."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.02)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    use_endpoint(monkeypatch, endpoint, cache)
    monkeypatch.setenv("MERGE_HUB_PROBE_TIMEOUT", "0.3")
    yield endpoint, accepted
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def seed(monkeypatch: pytest.MonkeyPatch, cache: Path, repos: dict[str, Path]) -> None:
    """Download ``repos`` (id -> folder served as main) into ``cache`` from a local server,
    then leave the environment pointing where it pointed before."""
    endpoint = os.environ["HF_ENDPOINT"]
    with HubServer({repo: {"main": folder} for repo, folder in repos.items()}) as server:
        use_endpoint(monkeypatch, server.endpoint, cache)
        for repo in repos:
            download_model(repo, None)
    use_endpoint(monkeypatch, endpoint, cache)


def write_recipe(folder: Path, models: list[str]) -> Path:
    """A linear recipe; model i is named on line 3 + 2 * i."""
    lines = ["merge_method: linear", "models:"]
    for model in models:
        lines += [f"  - model: {model}", "    parameters: {weight: 1}"]
    path = folder / "recipe.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def validate(path: Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["validate", str(path)])
    return result.exit_code, result.stdout, result.stderr


def not_cached(path: Path, i: int, model: str, cache: Path, why: str) -> str:
    return (
        f"error: {path}:{3 + 2 * i}: models[{i}].model: model '{model}': not in the Hugging "
        f"Face cache ({cache}) and {why}; {STEP}"
    )


def test_unreachable_hub_is_tried_once_and_every_model_reported(
    lookups: list[str], cache: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    models = ["org/a", "org/b", "org/c"]
    path = write_recipe(tmp_path, models)
    code, stdout, stderr = validate(path)
    assert lookups == ["hub.invalid"]  # the probe; no model request, no retry
    assert code == 2 and stdout == ""
    why = f"the Hub at {UNREACHABLE} cannot be reached ({DNS_ERROR})"
    assert stderr.splitlines() == [not_cached(path, i, m, cache, why) for i, m in enumerate(models)]
    assert capfd.readouterr().err == ""  # huggingface_hub's logger printed no retry either
    validate(path)
    assert lookups == ["hub.invalid"] * 2  # the next run decides afresh


def test_cached_models_resolve_while_the_hub_is_unreachable(
    lookups: list[str],
    cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    llama_base: Path,
    llama_ft1: Path,
) -> None:
    seed(monkeypatch, cache, {"org/cached": llama_base, "org/also-cached": llama_ft1})
    path = write_recipe(tmp_path, ["org/a", "org/cached", "org/b"])
    code, stdout, stderr = validate(path)
    assert code == 2 and stdout == "" and lookups == ["hub.invalid"]
    why = f"the Hub at {UNREACHABLE} cannot be reached ({DNS_ERROR})"
    assert stderr.splitlines() == [
        not_cached(path, 0, "org/a", cache, why),
        not_cached(path, 2, "org/b", cache, why),
    ]
    code, stdout, stderr = validate(write_recipe(tmp_path, ["org/cached", "org/also-cached"]))
    assert code == 0 and stderr == "" and stdout.startswith(f"{path}: ok")
    assert lookups == ["hub.invalid"] * 2


def test_a_probe_that_times_out_costs_one_timeout(
    silent_hub: tuple[str, list], cache: Path, tmp_path: Path
) -> None:
    endpoint, accepted = silent_hub
    models = ["org/a", "org/b", "org/c"]
    path = write_recipe(tmp_path, models)
    code, stdout, stderr = validate(path)
    assert code == 2 and stdout == "" and len(accepted) == 1
    why = f"the Hub at {endpoint} cannot be reached ({NO_ANSWER})"
    assert stderr.splitlines() == [not_cached(path, i, m, cache, why) for i, m in enumerate(models)]


def test_a_name_lookup_that_hangs_costs_one_timeout(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's timeout does not bound the name lookup; the probe's own wait does."""
    use_endpoint(monkeypatch, UNREACHABLE, cache)
    monkeypatch.setenv("MERGE_HUB_PROBE_TIMEOUT", "0.3")
    release, lookups = threading.Event(), []
    real = socket.getaddrinfo

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
        if host != "hub.invalid":
            return real(host, *args, **kwargs)  # type: ignore[arg-type]
        lookups.append(host)
        release.wait(30)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    models = ["org/a", "org/b"]
    path = write_recipe(tmp_path, models)
    try:
        code, stdout, stderr = validate(path)
    finally:
        release.set()
    assert code == 2 and stdout == "" and lookups == ["hub.invalid"]
    why = f"the Hub at {UNREACHABLE} cannot be reached ({NO_ANSWER})"
    assert stderr.splitlines() == [not_cached(path, i, m, cache, why) for i, m in enumerate(models)]


def test_hf_hub_offline_skips_the_probe(
    lookups: list[str], cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, stderr = validate(write_recipe(tmp_path, ["org/a", "org/b"]))
    assert code == 2 and lookups == []
    assert stderr.count("HF_HUB_OFFLINE=1 is set; download it once online or use a local") == 2


def test_a_later_network_error_marks_the_hub_unreachable(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe answered, then a listing fails: the run's next models do not try the Hub."""
    use_endpoint(monkeypatch, UNREACHABLE, cache)
    probes: list[None] = []
    listings: list[str] = []
    monkeypatch.setattr(hub, "probe_hub", lambda: probes.append(None))

    def list_repo_files(self: object, repo_id: str, revision: str | None = None) -> list[str]:
        listings.append(repo_id)
        raise ConnectionError("connection reset")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    why = f"the Hub at {UNREACHABLE} cannot be reached (ConnectionError: connection reset)"
    with hub_run():
        for repo in ("org/a", "org/b"):
            with pytest.raises(SourceError, match="not in the Hugging Face cache") as info:
                download_model(repo, None)
            assert why in str(info.value)
    assert len(probes) == 1 and listings == ["org/a"]
    with hub_run():
        with pytest.raises(SourceError):
            download_model("org/b", None)
    assert len(probes) == 2 and listings == ["org/a", "org/b"]  # a new run tries again


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan", "inf"])
def test_bad_probe_timeout(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MERGE_HUB_PROBE_TIMEOUT", value)
    with pytest.raises(SourceError) as info:
        hub.probe_timeout()
    assert str(info.value) == (
        f"MERGE_HUB_PROBE_TIMEOUT='{value}': expected a number of seconds > 0"
    )
